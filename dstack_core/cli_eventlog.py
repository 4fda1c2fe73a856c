"""``dstack-agent eventlog show``: the TDX boot event log and the RTMR0-2 it replays to.

For operators debugging boot measurements: it reads the machine's ACPI CCEL log area (or a
CCEL data file), prints each event as the same JSON object the agent API returns (full
payloads, as in Info's ``tcb_info.event_log``), then RTMR0-2 replayed from those events,
to compare with a quote. ``--json`` prints one document ``{"events": [...], "rtmrs":
{"rtmr0": hex, "rtmr1": hex, "rtmr2": hex}}`` instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path, PurePosixPath
from typing import Any, Final

from .errors import ConfigurationError, EvidenceError

# The CCEL parser loads only when the command runs, so ``dstack-agent serve`` (which builds
# this parser) does not pay for it.

__all__ = ["CCEL_DATA", "register"]

CCEL_DATA: Final = PurePosixPath("sys/firmware/acpi/tables/data/CCEL")
"""The CCEL log area below the root (``/sys/firmware/acpi/tables/data/CCEL``, Linux 6.4+)."""
BOOT_RTMRS: Final = 3


def register(commands: Any) -> None:
    """Add the ``eventlog`` command to the CLI's sub-parsers."""
    eventlog = commands.add_parser(
        "eventlog",
        help="boot event log tools",
        description="Tools for the TDX boot event log (ACPI CCEL, TCG2 crypto-agile).",
    )
    sub = eventlog.add_subparsers(dest="eventlog_command", metavar="COMMAND", required=True)
    show = sub.add_parser(
        "show",
        help="print the boot event log and the RTMR0-2 it replays to",
        description="Print the boot event log, one JSON event per line as the agent API "
        "returns them, followed by RTMR0-2 replayed from it. Reads the machine's CCEL "
        "(root only) unless --ccel names a CCEL data file.",
    )
    show.add_argument(
        "--ccel", type=Path, help="a CCEL log area file (default: ROOT/" + str(CCEL_DATA) + ")"
    )
    show.add_argument(
        "--root", type=Path, default=Path("/"), help="directory the sysfs paths hang off (default /)"
    )
    show.add_argument(
        "--json", action="store_true", help="print one JSON document with events and rtmrs"
    )
    show.set_defaults(func=_cmd_show)


def _read_ccel(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(
            f"no CCEL boot event log at {path} (TDX guests on Linux 6.4+ have one; "
            "or pass --ccel FILE)"
        ) from None
    except PermissionError:
        raise ConfigurationError(f"cannot read {path}: permission denied (root only)") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None


def _cmd_show(args: argparse.Namespace) -> int:
    from .ccel import parse_ccel
    from .eventlog import replay

    path = args.ccel if args.ccel is not None else args.root / CCEL_DATA
    try:
        events = parse_ccel(_read_ccel(path))
    except EvidenceError as exc:
        raise EvidenceError(f"{path}: {exc.message}") from None
    rtmrs = {f"rtmr{i}": replay(events, i).hex() for i in range(BOOT_RTMRS)}
    if args.json:
        print(json.dumps({"events": [e.to_json() for e in events], "rtmrs": rtmrs}, indent=2))
        return 0
    for event in events:
        print(json.dumps(event.to_json(), ensure_ascii=False))
    for name, value in rtmrs.items():
        print(f"{name}: {value}")
    return 0
