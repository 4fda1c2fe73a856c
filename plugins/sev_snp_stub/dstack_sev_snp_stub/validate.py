"""The relying party's policy for SEV-SNP reports: guest policy, platform, VMPL, minimum TCB.

This is go-sev-guest's ``validate`` step: claims of a report whose signature
:mod:`.verify` checks, held against an explicit :class:`SnpPolicy`. Every field of the
policy says what its default is and whether ``None`` means "not checked"; every finding is
a :class:`Mismatch` naming the field, the value found and the value wanted.

Defaults, and why:

* ``allow_debug=False``: a guest whose policy allows DEBUG can have its memory read and
  changed by the host (``SNP_DBG_DECRYPT``/``ENCRYPT``); nothing it reports is worth
  anything.
* ``allow_migration_agent=False``: a migration agent can export the guest's memory and
  state to another machine; dstack's CVMs never use one.
* ``allow_smt=True``: SMT is on on most SNP hosts and QEMU's default policy allows it; set
  it to False to require a guest that the firmware runs only with SMT off (policy bit 16
  clear), a defence against sibling-thread side channels.
* ``vmpl``, ``minimum_guest_svn``, ``minimum_abi``, ``minimum_tcb``: ``None`` (not
  checked); the values found are still reported.

Always checked, whatever the policy: policy bit 17 must be one, and the platform must
honour what the guest policy demands (SMT off, RAPL off, ciphertext hiding), as the firmware
guarantees at launch: a report that says otherwise is inconsistent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from dstack_core.snp import (
    PLATFORM_INFO_CIPHERTEXT_HIDING_EN,
    PLATFORM_INFO_RAPL_DIS,
    PLATFORM_INFO_SMT_EN,
    POLICY_ABI_MASK,
    POLICY_CIPHERTEXT_HIDING,
    POLICY_DEBUG,
    POLICY_MIGRATE_MA,
    POLICY_RAPL_DIS,
    POLICY_RESERVED_ONE,
    POLICY_SINGLE_SOCKET,
    POLICY_SMT,
    SnpReport,
)

from .amd import TcbVersion

__all__ = [
    "MAX_VMPL",
    "TCB_COMPONENTS",
    "Mismatch",
    "SnpPolicy",
    "policy_findings",
    "tcb_minimum_findings",
]

MAX_VMPL: Final = 3
TCB_COMPONENTS: Final = frozenset({"fmc", "bootloader", "tee", "snp", "microcode"})
"""Names :attr:`SnpPolicy.minimum_tcb` may use (``fmc`` applies to Turin only)."""


@attrs.frozen
class Mismatch:
    """One field whose value is not what is wanted.

    :ivar field: the report or certificate field, e.g. ``policy.DEBUG``.
    :ivar found: the value found, as text.
    :ivar wanted: the value (or range) wanted, as text.
    """

    field: str
    found: str
    wanted: str

    def __str__(self) -> str:
        return f"{self.field} is {self.found}, wanted {self.wanted}"

    def to_json(self) -> dict[str, str]:
        """``{"field", "found", "wanted"}``."""
        return {"field": self.field, "found": self.found, "wanted": self.wanted}


def _optional_vmpl(_inst: object, _attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_VMPL:
        raise ValueError(f"vmpl must be 0..{MAX_VMPL} or None, got {value}")


def _minimum_tcb(
    _inst: object, _attr: attrs.Attribute[Any], value: Mapping[str, int] | None
) -> None:
    if value is None:
        return
    unknown = set(value) - TCB_COMPONENTS
    if unknown:
        raise ValueError(
            f"unknown TCB components {sorted(unknown)}; known: {sorted(TCB_COMPONENTS)}"
        )
    if any(not 0 <= v <= 0xFF for v in value.values()):
        raise ValueError("minimum TCB components must be 0..255")


@attrs.frozen(kw_only=True)
class SnpPolicy:
    """What the relying party requires of an SNP guest (see the module docstring).

    :ivar allow_debug: accept a guest policy with DEBUG (bit 19) set. Default False.
    :ivar allow_migration_agent: accept MIGRATE_MA (bit 18). Default False.
    :ivar allow_smt: accept a guest policy that allows SMT (bit 16). Default True.
    :ivar vmpl: the VMPL the report must have been requested at; None: not checked.
    :ivar minimum_guest_svn: the lowest acceptable GUEST_SVN; None: not checked.
    :ivar minimum_abi: the lowest acceptable firmware ABI the policy names, as
        ``(major, minor)``; None: not checked.
    :ivar minimum_tcb: the lowest acceptable reported TCB, per component
        (:data:`TCB_COMPONENTS`); None: not checked. Components a product does not have
        are ignored.
    """

    allow_debug: bool = False
    allow_migration_agent: bool = False
    allow_smt: bool = True
    vmpl: int | None = attrs.field(default=None, validator=_optional_vmpl)
    minimum_guest_svn: int | None = None
    minimum_abi: tuple[int, int] | None = None
    minimum_tcb: Mapping[str, int] | None = attrs.field(default=None, validator=_minimum_tcb)


def _bit(value: int, mask: int) -> int:
    return 1 if value & mask else 0


def _allowed(allowed: bool) -> str:
    return "0 or 1" if allowed else "0"


def policy_findings(report: SnpReport, policy: SnpPolicy) -> tuple[list[Mismatch], str]:
    """The report's guest policy, platform info and VMPL against ``policy``.

    :returns: the mismatches (empty: the check passes) and a one-line account of what was
        found, for the check's detail.
    """
    problems: list[Mismatch] = []
    guest, platform = report.policy, report.platform_info
    if not guest & POLICY_RESERVED_ONE:
        problems.append(Mismatch("policy bit 17", "0", "1 (reserved, must be one)"))
    for name, mask, allowed in (
        ("DEBUG", POLICY_DEBUG, policy.allow_debug),
        ("MIGRATE_MA", POLICY_MIGRATE_MA, policy.allow_migration_agent),
        ("SMT", POLICY_SMT, policy.allow_smt),
    ):
        if guest & mask and not allowed:
            problems.append(Mismatch(f"policy.{name}", "1", _allowed(allowed)))
    # (policy bit, its value that makes a demand, platform bit, the value it then must have)
    for policy_name, policy_mask, demanding, platform_name, platform_mask, wanted in (
        ("SMT", POLICY_SMT, 0, "SMT_EN", PLATFORM_INFO_SMT_EN, 0),
        ("RAPL_DIS", POLICY_RAPL_DIS, 1, "RAPL_DIS", PLATFORM_INFO_RAPL_DIS, 1),
        ("CIPHERTEXT_HIDING", POLICY_CIPHERTEXT_HIDING, 1, "CIPHERTEXT_HIDING_EN",
         PLATFORM_INFO_CIPHERTEXT_HIDING_EN, 1),
    ):
        if _bit(guest, policy_mask) == demanding and _bit(platform, platform_mask) != wanted:
            problems.append(Mismatch(
                f"platform_info.{platform_name}", str(_bit(platform, platform_mask)),
                f"{wanted} (policy.{policy_name} is {demanding})",
            ))
    if policy.vmpl is not None and report.vmpl != policy.vmpl:
        problems.append(Mismatch("vmpl", str(report.vmpl), str(policy.vmpl)))
    if policy.minimum_guest_svn is not None and report.guest_svn < policy.minimum_guest_svn:
        problems.append(
            Mismatch("guest_svn", str(report.guest_svn), f">= {policy.minimum_guest_svn}")
        )
    abi = divmod(guest & POLICY_ABI_MASK, 0x100)
    if policy.minimum_abi is not None and abi < tuple(policy.minimum_abi):
        wanted_major, wanted_minor = policy.minimum_abi
        problems.append(
            Mismatch("policy.ABI", f"{abi[0]}.{abi[1]}", f">= {wanted_major}.{wanted_minor}")
        )
    found = (
        f"guest policy {guest:#x} (DEBUG {_bit(guest, POLICY_DEBUG)}, MIGRATE_MA "
        f"{_bit(guest, POLICY_MIGRATE_MA)}, SMT {_bit(guest, POLICY_SMT)}, SINGLE_SOCKET "
        f"{_bit(guest, POLICY_SINGLE_SOCKET)}, ABI >= {abi[0]}.{abi[1]}), platform info "
        f"{platform:#x} (SMT_EN {_bit(platform, PLATFORM_INFO_SMT_EN)}), VMPL {report.vmpl}, "
        f"guest SVN {report.guest_svn}"
    )
    return problems, found


def tcb_minimum_findings(tcb: TcbVersion, policy: SnpPolicy) -> list[Mismatch]:
    """The reported TCB's components against :attr:`SnpPolicy.minimum_tcb`."""
    if policy.minimum_tcb is None:
        return []
    parts = tcb.parts
    return [
        Mismatch(f"reported_tcb.{name}", str(parts[name]), f">= {minimum} (policy minimum)")
        for name, minimum in sorted(policy.minimum_tcb.items())
        if name in parts and parts[name] < minimum
    ]
