"""``dstack-agent audit verify FILE``: check the hash chain of an audit log.

The verdict goes to stdout (one line, or JSON with ``--json``); a failed one is repeated
on stderr. Exit status: 0 when every record is intact (and the ``--anchor``, if given, is
in the chain); 1 naming the first broken record (edited, dropped, reordered, or not a
record) or a missing anchor; 3 when the only problem is a torn last line left by a
crash, which the agent removes when it next starts; 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .audit import Verification

# The audit log's module loads only when the command runs, so ``dstack-agent serve`` (which
# builds this parser) does not pay for it unless it keeps an audit log.

__all__ = ["EXIT_BROKEN", "EXIT_INTACT", "EXIT_TORN", "register"]

EXIT_INTACT: Final = 0
EXIT_BROKEN: Final = 1
EXIT_TORN: Final = 3


def register(commands: Any) -> None:
    """Add the ``audit`` command to the CLI's sub-parsers."""
    audit = commands.add_parser(
        "audit", help="audit log tools", description="Tools for the agent's audit log."
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    verify = sub.add_parser(
        "verify",
        help="check an audit log's hash chain",
        description="Check every record of an audit log (--audit-log) and the chain that "
        "links them. Exit 0 when intact, 1 naming the first broken record (edited, dropped "
        "or reordered), 3 when only the last line is torn (a crash; the agent repairs it at "
        "start-up).",
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the audit log")
    verify.add_argument(
        "--anchor", metavar="HASH",
        help="a record hash kept elsewhere (e.g. a head printed earlier): fail unless the "
        "chain still contains it",
    )
    verify.add_argument(
        "--json", action="store_true",
        help="print {verdict, records, head, problem, anchor_found} as JSON",
    )
    verify.set_defaults(func=_cmd_verify)


def _report(args: argparse.Namespace, verdict: str, message: str, result: Verification) -> None:
    problem = result.problem
    if args.json:
        doc = {
            "verdict": verdict, "records": result.records, "head": result.head,
            "problem": None if problem is None else attrs.asdict(problem),
            "anchor_found": result.anchor_found,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.file}: {message}")
    if verdict != "intact":
        print(f"dstack-agent audit verify: {verdict}: {message}", file=sys.stderr)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .audit import verify_audit_log

    try:
        result = verify_audit_log(args.file, anchor=args.anchor)
    except OSError as exc:
        raise ConfigurationError(f"cannot read audit log {args.file}: {exc.strerror}") from None
    before = f"{result.records} intact records before it, head {result.head}"
    if result.problem is not None:
        torn = result.problem.kind == "torn"
        _report(args, "torn" if torn else "broken", f"{result.problem.message}; {before}", result)
        return EXIT_TORN if torn else EXIT_BROKEN
    if result.anchor_found is False:
        _report(args, "broken", f"anchor {args.anchor} is not in the chain: the log was "
                f"rewritten or truncated after it; {result.records} records, head "
                f"{result.head}", result)
        return EXIT_BROKEN
    _report(args, "intact", f"intact, {result.records} records, head {result.head}", result)
    return EXIT_INTACT
