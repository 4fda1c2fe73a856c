"""The bookkeeping of one verification: each check's outcome and which the verdict needs.

Shared by the core's checks and available to verifier plugins (:class:`Checks` builds the
:class:`~dstack_core.verify.CheckResult` tuple a plugin answers, in its declared order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from ..slots import slot_setters
from .types import CHECK_STATUSES, DECLARED_CHECKS, CheckResult, CheckStatus

__all__ = ["Checks", "Outcome", "checked_result", "outcome", "short"]

Outcome = tuple[CheckStatus, str]
"""A check's ``(status, detail)``."""


def short(value: bytes) -> str:
    """Bytes for a detail: all of them up to 8, else the first 8 in hex and an ellipsis."""
    return value.hex() if len(value) <= 8 else f"{value[:8].hex()}…"


def outcome(problems: Sequence[str], done: Sequence[str]) -> Outcome:
    """``fail`` with the problems, else ``pass`` with what was done."""
    if problems:
        return "fail", "; ".join(problems)
    return "pass", "; ".join(done)


class Checks:
    """The outcome of each check of one verification, and which the verdict needs."""

    def __init__(self, *mandatory: str) -> None:
        self._outcomes: dict[str, Outcome] = {}
        self._mandatory = set(mandatory)

    def __getitem__(self, name: str) -> Outcome:
        return self._outcomes[name]

    def __setitem__(self, name: str, result: Outcome) -> None:
        self._outcomes[name] = result

    def require(self, name: str) -> None:
        """Make the verdict need ``name`` to pass."""
        self._mandatory.add(name)

    def is_mandatory(self, name: str) -> bool:
        return name in self._mandatory

    def claims(self, name: str, result: Outcome | None, absent: str) -> None:
        """A check of claims the evidence may not make: ``skipped`` with ``absent`` when
        there are none (``result`` None), else ``result``, and then mandatory."""
        if result is None:
            self[name] = ("skipped", absent)
        else:
            self[name] = result
            self.require(name)

    def results(self, names: Iterable[str]) -> tuple[CheckResult, ...]:
        """A :class:`CheckResult` per name, in that order.

        :raises ValueError: a name no verifier declared, or a status that is not one.
        """
        outcomes, mandatory = self._outcomes, self._mandatory
        return tuple(
            checked_result(name, outcomes[name][0], outcomes[name][1], name in mandatory)
            for name in names
        )


_NEW: Final = object.__new__
_RESULT_SLOTS: Final = slot_setters(CheckResult, "name", "status", "detail", "mandatory")


def checked_result(name: str, status: str, detail: str, mandatory: bool) -> CheckResult:
    """``CheckResult(name=..., status=..., detail=..., mandatory=...)`` with the same checks
    done inline (a verification makes a few dozen: attrs' validator calls were a measurable
    share of it).

    :raises ValueError: as :class:`CheckResult` does.
    """
    if name not in DECLARED_CHECKS or status not in CHECK_STATUSES or type(detail) is not str:
        return CheckResult(name=name, status=status, detail=detail,  # type: ignore[arg-type]
                           mandatory=mandatory)
    result = _NEW(CheckResult)
    set_name, set_status, set_detail, set_mandatory = _RESULT_SLOTS
    set_name(result, name)
    set_status(result, status)
    set_detail(result, detail)
    set_mandatory(result, mandatory)
    return result
