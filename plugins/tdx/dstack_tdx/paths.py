"""Where a TDX guest's kernel interfaces live, all below one configurable root.

Production uses ``/``; tests point the same code at a temporary tree. The relative paths are
the mainline kernel's (spec sections 1-3 of ``linux-tee-interfaces.md``).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Final

import attrs

from dstack_core.tsm import REPORT_DIR

__all__ = [
    "CCEL_DATA",
    "CCEL_TABLE",
    "CLASS_MEASUREMENTS_DIR",
    "DEFAULT_APPKEYS",
    "MEASUREMENTS_DIR",
    "REPORT_DIR",
    "TDX_DEVICE",
    "TdxPaths",
]

MEASUREMENTS_DIR: Final = PurePosixPath("sys/devices/virtual/misc/tdx_guest/measurements")
"""tsm-mr measurement registers of the tdx_guest driver (Linux 6.16+)."""
CLASS_MEASUREMENTS_DIR: Final = PurePosixPath("sys/class/misc/tdx_guest/measurements")
"""The same directory through the misc class symlink."""
CCEL_TABLE: Final = PurePosixPath("sys/firmware/acpi/tables/CCEL")
"""The raw ACPI CCEL table (56 bytes)."""
CCEL_DATA: Final = PurePosixPath("sys/firmware/acpi/tables/data/CCEL")
"""The CCEL log area: the TCG2 boot event log (Linux 6.4+)."""
TDX_DEVICE: Final = PurePosixPath("dev/tdx_guest")
"""The TDX guest misc device (GET_REPORT0 since 6.2; extend only on Intel out-of-tree kernels)."""
DEFAULT_APPKEYS: Final = PurePosixPath("dstack/.host-shared/.appkeys.json")
"""Where dstack's boot process (dstack-util) leaves the app keys."""


def under(root: Path, path: str | PurePosixPath) -> Path:
    """``path`` below ``root``; an absolute ``path`` is taken relative to ``root`` too."""
    relative = PurePosixPath(path)
    if relative.is_absolute():
        relative = relative.relative_to("/")
    return root / relative


@attrs.frozen
class TdxPaths:
    """Every kernel path the plugin touches, resolved below ``root``."""

    root: Path

    @property
    def report_dir(self) -> Path:
        return under(self.root, REPORT_DIR)

    @property
    def measurements_dir(self) -> Path:
        return under(self.root, MEASUREMENTS_DIR)

    @property
    def class_measurements_dir(self) -> Path:
        return under(self.root, CLASS_MEASUREMENTS_DIR)

    @property
    def ccel_table(self) -> Path:
        return under(self.root, CCEL_TABLE)

    @property
    def ccel_data(self) -> Path:
        return under(self.root, CCEL_DATA)

    @property
    def device(self) -> Path:
        return under(self.root, TDX_DEVICE)
