"""The verdict: :class:`VerificationResult`, its JSON documents and the claims it reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs

from ..eventlog import RuntimeEvent
from .types import CheckResult

__all__ = [
    "OS_IMAGE_WARNING",
    "SIMULATED_WARNING",
    "BootEvent",
    "VerificationResult",
    "VerifierIdentity",
    "no_registers_warning",
]

SIMULATED_WARNING: Final = (
    "SIMULATED EVIDENCE: verified against a simulator/external trust anchor, not backed by "
    "TEE hardware"
)
OS_IMAGE_WARNING: Final = (
    "OS IMAGE UNVERIFIED: nothing ties this app to a known OS image: MRTD and RTMR0-2 were "
    "compared with no OS image policy (--os-image-policy, --expect-mrtd/--expect-rtmr)"
)


def no_registers_warning(evidence_format: str) -> str:
    """The OS image warning for a format without MRTD and RTMRs."""
    return (
        f"OS IMAGE UNVERIFIED: {evidence_format} evidence has no MRTD or RTMRs, so no OS "
        "image policy applies: its launch measurement is reported and compared with nothing"
    )


@attrs.frozen(kw_only=True)
class BootEvent:
    """A boot (RTMR0-2) event whose register replayed to the quote's signed value.

    What the replay binds is the digest, in its register and position. The event data is
    reported only when it is itself what was measured (``sha384(payload) == digest``, e.g.
    EFI actions and separators); event types, names and other payloads (a kernel's device
    path, ``ACPI DATA``) are covered by no measurement and are not reported.

    :ivar imr: the register, 0-2.
    :ivar digest: the 48 bytes extended.
    :ivar payload: the measured event data, or None.
    """

    imr: int
    digest: bytes
    payload: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"imr", "digest", "payload"}``, bytes in hex, payload null when not bound."""
        return {
            "imr": self.imr,
            "digest": self.digest.hex(),
            "payload": None if self.payload is None else self.payload.hex(),
        }


@attrs.frozen(kw_only=True)
class VerifierIdentity:
    """The verifier plugin behind a result's platform checks.

    :ivar evidence_format: the format it verifies.
    :ivar plugin: its distribution (``dstack-tdx``).
    :ivar version: the distribution's version.
    :ivar checks: the platform checks it ran, in result order.
    """

    evidence_format: str
    plugin: str
    version: str
    checks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """``{"evidence_format", "plugin", "version", "checks"}``."""
        return {
            "evidence_format": self.evidence_format,
            "plugin": self.plugin,
            "version": self.version,
            "checks": list(self.checks),
        }


def _runtime_event_json(event: RuntimeEvent) -> dict[str, Any]:
    return {"event": event.event, "payload": event.payload.hex(), "version": event.version}


@attrs.frozen(kw_only=True)
class VerificationResult:
    """The verdict and every check, plus the claims the evidence binds.

    Every claim comes only from data the evidence's signature covers, directly
    (``mrtd``, ``rtmrs``, ``report_data``, ...) or through a replay that reproduces the
    signed registers (app identity, key provider, runtime and boot events); docs/verify.md
    has a table of what binds each field. Claims that nothing binds are empty (``b""``,
    ``()``, None), never the evidence's word. Evidence fields are what the decoder read;
    they are authenticated only when the verifier plugin's authenticating checks pass, and
    the identity claims are reported only then (:attr:`identity_bound`). Trust any of it
    only with a ``pass`` verdict. Byte values are raw bytes; :meth:`to_json` renders them in
    hex.
    """

    verdict: Literal["pass", "fail"]
    checks: tuple[CheckResult, ...]
    evidence_kind: str
    platform: str
    simulated: bool
    verified_at: int
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    quote_version: int = 0
    report_data: bytes = b""
    mrtd: bytes = b""
    rtmrs: tuple[bytes, ...] = ()
    mr_config_id: bytes = b""
    identity_bound: bool = False
    app_id: bytes = b""
    compose_hash: bytes = b""
    instance_id: bytes = b""
    key_provider: Mapping[str, str] | None = None
    key_provider_info: bytes = b""
    os_image_hash: bytes = b""
    os_image_verified: bool = False
    mr_aggregated: bytes = b""
    mr_system: bytes = b""
    device_id: bytes = b""
    init_script_hashes: tuple[bytes, ...] = ()
    runtime_events: tuple[RuntimeEvent, ...] = ()
    boot_events: tuple[BootEvent, ...] = ()
    evidence_format: str = "tdx"
    platform_details: Mapping[str, Any] | None = attrs.field(default=None, eq=False)
    verifier: VerifierIdentity | None = None
    quote_verified: bool = False
    tee_variant: str = ""
    warnings: tuple[str, ...] = ()
    """Plain statements about what the verdict does not cover: simulated evidence, and an
    OS image that nothing ties to a known one."""

    @property
    def passed(self) -> bool:
        """Whether the verdict is ``pass``."""
        return self.verdict == "pass"

    def check(self, name: str) -> CheckResult:
        """The result of the check called ``name``.

        :raises KeyError: no such check.
        """
        for result in self.checks:
            if result.name == name:
                return result
        raise KeyError(name)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the failed checks, in order."""
        return tuple(c.name for c in self.checks if c.status == "fail")

    @property
    def reason(self) -> str | None:
        """Why the verdict is ``fail``: the first failed check, else the first mandatory
        check that did not pass (e.g. skipped for want of collateral)."""
        if self.passed:
            return None
        for result in self.checks:
            if result.status == "fail":
                return f"{result.name}: {result.detail}"
        for result in self.checks:
            if result.mandatory and result.status != "pass":
                return f"{result.name}: {result.detail}"
        return "no check passed"  # pragma: no cover - a fail verdict always has a cause

    @property
    def details_key(self) -> str:
        """The key the format's own fields are reported under (``sev_snp``)."""
        return self.evidence_format.replace("-", "_").replace(".", "_")

    def claims(self) -> dict[str, Any]:
        """Every reported claim, as :meth:`to_json` renders it (no checks, verdict, time or
        verifier; the format's own fields, as its plugin decoded them, under
        :attr:`details_key`)."""
        doc: dict[str, Any] = {
            "evidence_kind": self.evidence_kind,
            "platform": self.platform,
            "simulated": self.simulated,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "quote_version": self.quote_version,
            "report_data": self.report_data.hex(),
            "mrtd": self.mrtd.hex(),
            "rtmrs": [r.hex() for r in self.rtmrs],
            "mr_config_id": self.mr_config_id.hex(),
            "identity_bound": self.identity_bound,
            "app_id": self.app_id.hex(),
            "compose_hash": self.compose_hash.hex(),
            "instance_id": self.instance_id.hex(),
            "key_provider": None if self.key_provider is None else dict(self.key_provider),
            "key_provider_info": self.key_provider_info.decode("utf-8", "replace"),
            "os_image_hash": self.os_image_hash.hex(),
            "os_image_verified": self.os_image_verified,
            "mr_aggregated": self.mr_aggregated.hex(),
            "mr_system": self.mr_system.hex(),
            "device_id": self.device_id.hex(),
            "init_script_hashes": [h.hex() for h in self.init_script_hashes],
            "runtime_events": [_runtime_event_json(e) for e in self.runtime_events],
            "boot_events": [e.to_json() for e in self.boot_events],
        }
        if self.platform_details is not None:
            doc[self.details_key] = dict(self.platform_details)
        return doc

    def _verifier_json(self) -> dict[str, Any] | None:
        return None if self.verifier is None else self.verifier.to_json()

    def to_json(self) -> dict[str, Any]:
        """The CLI's JSON document: verdict, warnings, checks by name, the verifier plugin
        behind the platform checks, then the claims."""
        doc: dict[str, Any] = {
            "verdict": self.verdict,
            "reason": self.reason,
            "simulated": self.simulated,
        }
        if self.simulated:
            doc["warning"] = SIMULATED_WARNING
        doc["warnings"] = list(self.warnings)
        doc["checks"] = {c.name: c.to_json() for c in self.checks}
        doc["verifier"] = self._verifier_json()
        doc["verified_at"] = self.verified_at
        doc["evidence_format"] = self.evidence_format
        doc.update(self.claims())
        return doc

    def to_upstream_json(self) -> dict[str, Any]:
        """The upstream verifier's ``/verify`` response shape (formats.md 2.4), plus our
        ``verdict``, ``simulated``, ``warnings``, per-check ``checks`` and ``verifier``.

        As upstream, ``is_valid`` needs the OS image verified: a ``pass`` verdict with an
        unverified OS image is ``is_valid: false`` with the ``os_image`` check as the reason.
        ``app_info``, ``boot_info`` and ``key_provider`` are null unless the identity is
        bound (upstream leaves them null when verification stops early).
        """
        listed = {c.name: c.status for c in self.checks}

        def passed(*names: str) -> bool:
            return all(listed.get(n) == "pass" for n in names)

        os_image_verified = passed("os_image")
        app_info: dict[str, Any] | None = None
        boot_info: dict[str, Any] | None = None
        if self.identity_bound:
            app_info = {
                "app_id": self.app_id.hex(),
                "compose_hash": self.compose_hash.hex(),
                "instance_id": self.instance_id.hex(),
                "device_id": self.device_id.hex(),
                "mr_system": self.mr_system.hex(),
                "mr_aggregated": self.mr_aggregated.hex(),
                "os_image_hash": self.os_image_hash.hex(),
                "key_provider_info": self.key_provider_info.hex(),
                "init_script_hashes": [h.hex() for h in self.init_script_hashes],
            }
            boot_info = {
                "teeVariant": self.tee_variant,
                "mrAggregated": self.mr_aggregated.hex(),
                "osImageHash": self.os_image_hash.hex(),
                "mrSystem": self.mr_system.hex(),
                "appId": self.app_id.hex(),
                "composeHash": self.compose_hash.hex(),
                "instanceId": self.instance_id.hex(),
                "deviceId": self.device_id.hex(),
                "keyProviderInfo": self.key_provider_info.hex(),
                "tcbStatus": self.tcb_status or "",
                "advisoryIds": list(self.advisory_ids),
            }
        details = {
            "quote_verified": self.quote_verified,
            "event_log_verified": passed("event_log", "runtime_events"),
            "os_image_hash_verified": os_image_verified,
            "acpi_tables_verified": False,
            "tee_variant": self.tee_variant,
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "key_provider": dict(self.key_provider) if self.key_provider is not None else None,
            "app_info": app_info,
            "boot_info": boot_info,
            "rtmrs": [r.hex() for r in self.rtmrs],
            "mrtd": self.mrtd.hex(),
        }
        reason = self.reason
        if reason is None and not os_image_verified:
            found = listed.get("os_image")
            reason = (
                f"os_image: {self.check('os_image').detail}" if found else OS_IMAGE_WARNING
            )
        return {
            "is_valid": self.passed and os_image_verified,
            "details": details,
            "reason": reason,
            "verdict": self.verdict,
            "simulated": self.simulated,
            "warnings": list(self.warnings),
            "checks": {c.name: c.to_json() for c in self.checks},
            "verifier": self._verifier_json(),
        }
