"""The values that cross the verifier contract (:mod:`dstack_core.verifier_hookspecs`).

A verifier plugin decodes its format's evidence into a :class:`PlatformReport` (structure
only), verifies it into a :class:`PlatformVerification` (its named platform checks), and
describes itself with a :class:`VerifierInfo`. The core checks every value it is handed
(:mod:`dstack_core.verify.host`) and runs the format-independent checks on what they carry:
the report data, and, for formats whose measurements follow dstack's register model, the
:class:`Registers` the event log replays into.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from ..eventlog import ZERO_REGISTER
from ..types import EVIDENCE_FORMAT_PATTERN, REPORT_DATA_LENGTH, RTMR_LENGTH, is_evidence_format

__all__ = [
    "CORE_CHECKS",
    "EVIDENCE_FORMAT_PATTERN",
    "CheckResult",
    "CheckStatus",
    "PlatformReport",
    "PlatformVerification",
    "Registers",
    "TrustInputs",
    "VerifierInfo",
    "is_check_name",
    "is_evidence_format",
]

CheckStatus = Literal["pass", "fail", "skipped"]
CHECK_STATUSES: Final = frozenset({"pass", "fail", "skipped"})

CORE_CHECKS: Final = (
    "evidence",
    "event_log",
    "runtime_events",
    "envelope_binding",
    "report_data",
    "ratls_binding",
    "ratls_chain",
    "os_image",
)
"""The checks the core runs on every format's evidence (``evidence`` first, the rest after
the plugin's platform checks). A plugin may use none of these names."""

_CHECK_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,47}")


def is_check_name(name: object) -> bool:
    """Whether ``name`` is a well-formed check name (snake_case, at most 48 characters)."""
    return isinstance(name, str) and _CHECK_NAME.fullmatch(name) is not None


def _check_status(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in CHECK_STATUSES:
        raise ValueError(f"check status must be pass, fail or skipped, not {value!r}")


DECLARED_CHECKS: Final[set[str]] = set(CORE_CHECKS)
"""The core's check names and every name a :class:`VerifierInfo` declared: the closed set a
:class:`CheckResult` may carry (a typo in a plugin is an error, not a new check)."""


def _check_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in DECLARED_CHECKS:
        raise ValueError(
            f"unknown check name {value!r}: neither the core's nor declared by a verifier "
            "plugin's VerifierInfo"
        )


@attrs.frozen(kw_only=True)
class CheckResult:
    """The outcome of one check.

    :ivar name: a stable snake_case name: one of :data:`CORE_CHECKS`, or one of the
        platform checks a verifier plugin declared (:attr:`VerifierInfo.checks`; declare
        it before making results).
    :ivar status: ``pass``, ``fail`` or ``skipped`` (not checked; ``detail`` says why).
    :ivar detail: what was compared or what the underlying library said, for humans.
    :ivar mandatory: whether the verdict needs this check to pass for this evidence.
    """

    name: str = attrs.field(validator=_check_name)
    status: CheckStatus = attrs.field(validator=_check_status)
    detail: str
    mandatory: bool = False

    def to_json(self) -> dict[str, Any]:
        """``{"status", "detail", "mandatory"}``."""
        return {"status": self.status, "detail": self.detail, "mandatory": self.mandatory}


def _register(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != RTMR_LENGTH:
        raise ValueError(f"Registers.{attribute.name} must be {RTMR_LENGTH} bytes")


def _four(value: Iterable[bytes]) -> tuple[bytes, bytes, bytes, bytes]:
    registers = tuple(value)
    if len(registers) != 4 or not all(
        isinstance(r, bytes) and len(r) == RTMR_LENGTH for r in registers
    ):
        raise ValueError(f"Registers.rtmrs must be four {RTMR_LENGTH}-byte registers")
    return registers[0], registers[1], registers[2], registers[3]



@attrs.frozen(kw_only=True)
class Registers:
    """Measurement registers in dstack's (TDX) model, as the evidence states them.

    dstack's identity lives in this model: firmware in ``mrtd``, boot in RTMR0-2 (replayed
    from the boot event log), the app's identity and its runtime events in RTMR3 (replayed
    from dstack's runtime events), all SHA-384 extend registers starting at zero. A
    format whose hardware measures this way hands them to the core, which replays the
    event log into them and derives the app identity and ``mr_aggregated``/``mr_system``;
    the core reports a value as a claim only when the plugin says the evidence is
    authenticated.

    :ivar mrtd: the build-time measurement (48 bytes).
    :ivar rtmrs: RTMR0..3 (48 bytes each).
    :ivar mr_config_id: 48 bytes (zero when the format has none).
    :ivar mr_owner: 48 bytes (zero when the format has none).
    :ivar mr_owner_config: 48 bytes (zero when the format has none).
    """

    mrtd: bytes = attrs.field(validator=_register)
    rtmrs: tuple[bytes, bytes, bytes, bytes] = attrs.field(converter=_four)
    mr_config_id: bytes = attrs.field(default=ZERO_REGISTER, validator=_register)
    mr_owner: bytes = attrs.field(default=ZERO_REGISTER, validator=_register)
    mr_owner_config: bytes = attrs.field(default=ZERO_REGISTER, validator=_register)

    # The names of a TD report, so that identity derivation reads either.
    @property
    def mr_td(self) -> bytes:
        return self.mrtd

    @property
    def rtmr0(self) -> bytes:
        return self.rtmrs[0]

    @property
    def rtmr1(self) -> bytes:
        return self.rtmrs[1]

    @property
    def rtmr2(self) -> bytes:
        return self.rtmrs[2]

    @property
    def rtmr3(self) -> bytes:
        return self.rtmrs[3]


def _report_data(_inst: object, _attr: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != REPORT_DATA_LENGTH:
        raise ValueError(f"PlatformReport.report_data must be {REPORT_DATA_LENGTH} bytes")


def _format_name(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not is_evidence_format(value):
        raise ValueError(f"{attribute.name} {value!r} is not a valid evidence format name")


@attrs.frozen(kw_only=True)
class PlatformReport:
    """A format's platform evidence, decoded: structurally valid, **nothing verified yet**.

    What the decoder reads from the bytes is what the evidence *says*; it becomes a claim
    only when :class:`PlatformVerification` says the evidence is authenticated.

    :ivar evidence_format: the format (the plugin's entry-point name).
    :ivar raw: the evidence bytes as given (a TDX quote, an SNP report, ...).
    :ivar report_data: the 64 bytes of report data the evidence carries at the place its
        signature covers (TDX: the TD report's; SNP: offset ``0x50``).
    :ivar platform: what the evidence is, from its format and content, never from free text:
        usually the format name; a simulated variant that marks itself in signed data names
        that (the simulator's TDX quotes say ``simulator``).
    :ivar marked_simulated: the evidence marks itself as simulated (a signed marker, such
        as the simulator's ``DSTACK-SIMULATOR`` header user data). Never trusted to say
        *not* simulated.
    :ivar description: one line for the ``evidence`` check: what was decoded, e.g. ``TDX
        quote v4 (TD 1.0 body)``.
    :ivar identity: how the evidence says what it is, for messages about a platform tag
        that disagrees (``the quote is not marked DSTACK-SIMULATOR``).
    :ivar noun: what to call the evidence in check details (``quote``, ``report``).
    :ivar version: the evidence's own version (reported as ``quote_version``).
    :ivar registers: the measurement registers in dstack's model, or None when the format
        has none (SEV-SNP): the core then binds no event log and derives no identity.
    :ivar details: JSON-able fields of the evidence for people (reported under the
        format's name, e.g. ``sev_snp``, as the evidence states them), or None.
    :ivar parsed: the plugin's own parsed form, handed back to it for verification; the
        core never reads it.
    """

    evidence_format: str = attrs.field(validator=_format_name)
    raw: bytes = attrs.field(repr=False)
    report_data: bytes = attrs.field(validator=_report_data)
    platform: str = attrs.field(validator=_format_name)
    marked_simulated: bool = False
    description: str = ""
    identity: str = ""
    noun: str = "evidence"
    version: int = 0
    registers: Registers | None = None
    details: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)
    parsed: Any = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class PlatformVerification:
    """What a verifier plugin found about one :class:`PlatformReport`.

    :ivar checks: one :class:`CheckResult` per name in :attr:`VerifierInfo.checks`, in that
        order; a failed check is data, never an exception.
    :ivar simulated: the evidence is not backed by hardware the relying party trusts by
        default: it is marked simulated, or its chain ended at an external root
        (``VerifyOptions.root_ca_der``). A plugin must fail one of its authenticating
        checks for simulated evidence unless ``VerifyOptions.allow_simulator`` is set (the
        core fails the verification itself when a plugin does not).
    :ivar tcb_status: the platform's TCB status, as its vendor's collateral judged it, or
        None when not known.
    :ivar advisory_ids: security advisories that apply to the platform.
    :ivar device_id: a hardware identity the signature covers (TDX: ``sha256(ppid)``), or
        empty; reported only when the evidence is authenticated.
    """

    checks: tuple[CheckResult, ...]
    simulated: bool = False
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    device_id: bytes = b""


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class VerifierInfo:
    """Who a verifier plugin is and what its results look like; fixed for the process.

    :ivar evidence_format: the format it verifies: its entry-point name in
        ``dstack_core.verifiers``.
    :ivar checks: its platform checks, in result order (between the core's ``evidence`` and
        the core's other checks). Stable API for its users: never rename one.
    :ivar authenticated_by: the checks that together say the evidence's signature verified
        up to a root the relying party accepts (a non-empty subset of ``checks``, always
        mandatory). Nothing is reported as a claim unless they all pass.
    :ivar quote_verified_by: the checks behind the upstream shape's ``quote_verified``
        (``authenticated_by`` plus e.g. debug and policy checks): it is true when each of
        them passed or was skipped as not mandatory.
    :ivar tee_variant: the upstream shape's ``tee_variant`` (``dstack-tdx``).
    :ivar options: the ``--verifier-option`` keys it accepts, each with a one-line
        description; any other key is a configuration error.
    :ivar description: one line for people (``dstack-agent verifiers``).
    """

    evidence_format: str = attrs.field(validator=_format_name)
    checks: tuple[str, ...] = attrs.field(converter=_names)
    authenticated_by: tuple[str, ...] = attrs.field(converter=_names)
    quote_verified_by: tuple[str, ...] = attrs.field(converter=_names)
    tee_variant: str = ""
    options: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    description: str = ""

    def __attrs_post_init__(self) -> None:
        problems = [n for n in self.checks if not is_check_name(n) or n in CORE_CHECKS]
        if problems or len(set(self.checks)) != len(self.checks) or not self.checks:
            raise ValueError(
                f"checks must be distinct snake_case names other than the core's "
                f"({', '.join(CORE_CHECKS)}); got {list(self.checks)}"
            )
        for field, names in (
            ("authenticated_by", self.authenticated_by),
            ("quote_verified_by", self.quote_verified_by),
        ):
            if not names or not set(names) <= set(self.checks):
                raise ValueError(f"{field} must be a non-empty subset of checks")
        DECLARED_CHECKS.update(self.checks)


@attrs.frozen(kw_only=True)
class TrustInputs:
    """Where collateral may come from, as the operator configured the verifier.

    Handed to every plugin's ``fetch_collateral``; a plugin uses what applies to its format
    and ignores the rest.

    :ivar collateral_cache: a directory the plugin may cache fetched collateral in (shared
        by processes: write atomically), or None.
    :ivar pccs_url: an Intel PCCS to fetch TDX collateral from, or None.
    :ivar pccs_fetcher: ``async fetch(pccs_url, quote) -> collateral JSON`` to use instead
        of dcap-qvl's client (tests inject one), or None.
    :ivar options: per evidence format, that format's ``--verifier-option`` settings.
    """

    collateral_cache: Path | None = None
    pccs_url: str | None = None
    pccs_fetcher: Callable[[str, bytes], Awaitable[str]] | None = attrs.field(
        default=None, eq=False
    )
    options: Mapping[str, Mapping[str, str]] = attrs.field(factory=dict, hash=False)

    def options_for(self, evidence_format: str) -> Mapping[str, str]:
        """The options given for ``evidence_format`` (empty: defaults)."""
        return self.options.get(evidence_format, {})
