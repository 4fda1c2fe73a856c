"""App identity derived from measurements: the values Info reports and verifiers recompute.

Pure functions over an event log, a TD report and the vm_config string. Only runtime events
*before the first* ``system-ready`` count for identity: everything after it is under the
app's control (EmitEvent), so an app cannot spoof its own ``app-id`` or ``compose-hash``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from .envelope import AppInfo
from .eventlog import TdxEvent, replay

__all__ = [
    "SYSTEM_READY",
    "BOOT_MR_DONE",
    "DEVICE_ID_UNVERIFIED",
    "boot_event_payload",
    "boot_event_payloads",
    "os_image_hash_from_vm_config",
    "mr_aggregated",
    "mr_system",
    "derive_app_info",
    "SignedRegisters",
]

SYSTEM_READY: Final = "system-ready"
BOOT_MR_DONE: Final = "boot-mr-done"
# Upstream reports sha256(ppid) only after verification; an unverified decode hashes nothing.
DEVICE_ID_UNVERIFIED: Final = hashlib.sha256(b"").digest()
RUNTIME_IMR: Final = 3


def boot_event_payload(events: Iterable[TdxEvent], name: str) -> bytes | None:
    """Payload of the first runtime event called ``name`` before the first ``system-ready``."""
    for event in events:
        if event.imr != RUNTIME_IMR:
            continue
        if event.event == SYSTEM_READY:
            return None
        if event.event == name:
            return event.event_payload
    return None


def boot_event_payloads(events: Iterable[TdxEvent], name: str) -> tuple[bytes, ...]:
    """Payloads of every runtime event called ``name`` before the first ``system-ready``,
    in order (e.g. ``init-script-hash``)."""
    found = []
    for event in events:
        if event.imr != RUNTIME_IMR:
            continue
        if event.event == SYSTEM_READY:
            break
        if event.event == name:
            found.append(event.event_payload)
    return tuple(found)


def os_image_hash_from_vm_config(vm_config: str) -> bytes:
    """``os_image_hash`` of a vm_config JSON string (or of a sys-config whose ``vm_config``
    key nests it as a string); empty when absent or unparsable."""
    try:
        doc = json.loads(vm_config) if vm_config else {}
        if isinstance(doc, dict) and isinstance(doc.get("vm_config"), str):
            doc = json.loads(doc["vm_config"])
        value = doc.get("os_image_hash", "") if isinstance(doc, dict) else ""
        return bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""


class SignedRegisters(Protocol):
    """The registers identity is derived from: a TD report
    (:class:`~dstack_core.quote.TdReport`) or a verifier plugin's
    :class:`~dstack_core.verify.Registers`."""

    @property
    def mr_td(self) -> bytes: ...
    @property
    def rtmr0(self) -> bytes: ...
    @property
    def rtmr1(self) -> bytes: ...
    @property
    def rtmr2(self) -> bytes: ...
    @property
    def mr_config_id(self) -> bytes: ...
    @property
    def mr_owner(self) -> bytes: ...
    @property
    def mr_owner_config(self) -> bytes: ...


def _config_registers(report: SignedRegisters) -> bytes:
    registers = report.mr_config_id + report.mr_owner + report.mr_owner_config
    return registers if any(registers) else b""


def mr_aggregated(
    report: SignedRegisters, runtime_events: Sequence[TdxEvent], rtmr3: bytes | None = None
) -> bytes:
    """``sha256(mrtd || rtmr0..2 || replay(runtime) [|| mr_config_id || mr_owner ||
    mr_owner_config when any is non-zero])``, as upstream computes it.

    :param rtmr3: the replay of ``runtime_events``, when the caller has it already.
    """
    if rtmr3 is None:
        rtmr3 = replay(runtime_events, RUNTIME_IMR)
    return hashlib.sha256(
        report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + rtmr3
        + _config_registers(report)
    ).digest()


def mr_system(report: SignedRegisters, events: Sequence[TdxEvent]) -> bytes:
    """``sha256(mrtd || rtmr0..2 || sha256(key-provider payload) or 32 zero bytes)``."""
    provider = boot_event_payload(events, "key-provider")
    mr_key_provider = hashlib.sha256(provider).digest() if provider is not None else bytes(32)
    return hashlib.sha256(
        report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + mr_key_provider
    ).digest()


def derive_app_info(
    report: SignedRegisters, events: Sequence[TdxEvent], vm_config: str,
    rtmr3: bytes | None = None,
) -> AppInfo:
    """Every identity value of the app, from the quote's TD report and the full event log.

    :param rtmr3: the replay of the log's RTMR3 events, when the caller has it already.
    """
    runtime = [e for e in events if e.imr == RUNTIME_IMR]
    return AppInfo(
        app_id=boot_event_payload(runtime, "app-id") or b"",
        compose_hash=boot_event_payload(runtime, "compose-hash") or b"",
        instance_id=boot_event_payload(runtime, "instance-id") or b"",
        device_id=DEVICE_ID_UNVERIFIED,
        mr_aggregated=mr_aggregated(report, runtime, rtmr3),
        mr_system=mr_system(report, runtime),
        os_image_hash=os_image_hash_from_vm_config(vm_config),
        key_provider_info=boot_event_payload(runtime, "key-provider") or b"",
    )
