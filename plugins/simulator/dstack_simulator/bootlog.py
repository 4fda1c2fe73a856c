"""The simulator's synthetic firmware: MRTD and a boot event log for RTMR0..2.

Shaped like a real TDX boot (OVMF tables and variables, the three ACPI DATA events,
kernel and EFI actions, kernel command line and initrd) with deterministic contents, so
RTMR0..2 are the same on every simulated machine and replay exactly from the log.
"""

from __future__ import annotations

import hashlib
from typing import Final

from dstack_core.eventlog import TdxEvent

__all__ = ["SIMULATED_MRTD", "synthetic_boot_log"]

SIMULATED_MRTD: Final = hashlib.sha384(b"dstack-core simulator TD firmware").digest()

EV_SEPARATOR: Final = 0x00000004
EV_EVENT_TAG: Final = 0x00000006
EV_PLATFORM_CONFIG_FLAGS: Final = 0x0000000A
EV_EFI_VARIABLE_DRIVER_CONFIG: Final = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION: Final = 0x80000003
EV_EFI_ACTION: Final = 0x80000007
EV_EFI_HANDOFF_TABLES2: Final = 0x8000000B
ACPI_DATA: Final = b"ACPI DATA"

# (imr, event type, name, payload, what the digest measures)
_EVENTS: Final = (
    (0, EV_EFI_HANDOFF_TABLES2, "", b"\x09TdxTable", b"simulated TD HOB"),
    (0, EV_EFI_VARIABLE_DRIVER_CONFIG, "", b"SecureBoot\0", b"SecureBoot=0"),
    (0, EV_EFI_VARIABLE_DRIVER_CONFIG, "", b"PK\0", b"PK="),
    (0, EV_SEPARATOR, "", bytes(4), bytes(4)),
    (0, EV_PLATFORM_CONFIG_FLAGS, "acpi-loader", ACPI_DATA, b"simulated etc/table-loader"),
    (0, EV_PLATFORM_CONFIG_FLAGS, "acpi-rsdp", ACPI_DATA, b"simulated acpi/rsdp"),
    (0, EV_PLATFORM_CONFIG_FLAGS, "acpi-tables", ACPI_DATA, b"simulated etc/acpi/tables"),
    (1, EV_EFI_BOOT_SERVICES_APPLICATION, "", b"\\EFI\\BOOT\\BOOTX64.EFI", b"simulated kernel"),
    (1, EV_EFI_ACTION, "", b"Calling EFI Application from Boot Option",
     b"Calling EFI Application from Boot Option"),
    (1, EV_SEPARATOR, "", bytes(4), bytes(4)),
    (1, EV_EFI_ACTION, "", b"Exit Boot Services Invocation", b"Exit Boot Services Invocation"),
    (2, EV_EVENT_TAG, "", b"LOADED_IMAGE::LoadOptions", b"console=ttyS0 dstack.simulated=1"),
    (2, EV_EVENT_TAG, "", b"Linux initrd", b"simulated initrd"),
)


def synthetic_boot_log() -> tuple[TdxEvent, ...]:
    """The boot events in measurement order, with digests and payloads."""
    return tuple(
        TdxEvent(
            imr=imr,
            event_type=event_type,
            digest=hashlib.sha384(measured).digest(),
            event=name,
            event_payload=payload,
        )
        for imr, event_type, name, payload, measured in _EVENTS
    )
