"""``dstack-agent audit verify FILE``: check the hash chain of an audit log.

Exit status: 0 when every record is intact (and the ``--anchor``, if given, is in the
chain); 1 naming the first broken record (edited, dropped, reordered, or not a record)
or a missing anchor; 3 when the only problem is a torn last line left by a crash, which
the agent removes when it next starts; 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Final

from .audit import verify_audit_log
from .errors import ConfigurationError

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
    verify.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        result = verify_audit_log(args.file, anchor=args.anchor)
    except OSError as exc:
        raise ConfigurationError(f"cannot read audit log {args.file}: {exc.strerror}") from None
    problem = result.problem
    if problem is not None:
        print(f"{args.file}: {problem.message}", file=sys.stderr)
        print(f"{args.file}: {result.records} intact records before it, head {result.head}",
              file=sys.stderr)
        return EXIT_TORN if problem.kind == "torn" else EXIT_BROKEN
    if result.anchor_found is False:
        print(f"{args.file}: anchor {args.anchor} is not in the chain: the log was rewritten "
              "or truncated after it", file=sys.stderr)
        return EXIT_BROKEN
    print(f"{args.file}: intact, {result.records} records, head {result.head}")
    return EXIT_INTACT
