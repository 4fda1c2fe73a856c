"""App identity derived from measurements: the values Info reports and verifiers recompute.

Pure functions over an event log, a TD report and the vm_config string. Only runtime events
*before the first* ``system-ready`` count for identity: everything after it is under the
app's control (EmitEvent), so an app cannot spoof its own ``app-id`` or ``compose-hash``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
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
    "IDENTITY_EVENTS",
    "identity_payloads",
    "app_info_of",
    "SignedRegisters",
]

SYSTEM_READY: Final = "system-ready"
BOOT_MR_DONE: Final = "boot-mr-done"
# Upstream reports sha256(ppid) only after verification; an unverified decode hashes nothing.
DEVICE_ID_UNVERIFIED: Final = hashlib.sha256(b"").digest()
RUNTIME_IMR: Final = 3
IDENTITY_EVENTS: Final = ("app-id", "compose-hash", "instance-id", "key-provider")
"""The runtime events whose first payload before ``system-ready`` is the app's identity."""


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


def _mr_aggregated(report: SignedRegisters, rtmr3: bytes) -> bytes:
    return hashlib.sha256(
        report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + rtmr3
        + _config_registers(report)
    ).digest()


def _mr_system(report: SignedRegisters, key_provider: bytes | None) -> bytes:
    mr_key_provider = (
        hashlib.sha256(key_provider).digest() if key_provider is not None else bytes(32)
    )
    return hashlib.sha256(
        report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + mr_key_provider
    ).digest()


def mr_aggregated(
    report: SignedRegisters, runtime_events: Sequence[TdxEvent], rtmr3: bytes | None = None
) -> bytes:
    """``sha256(mrtd || rtmr0..2 || replay(runtime) [|| mr_config_id || mr_owner ||
    mr_owner_config when any is non-zero])``, as upstream computes it.

    :param rtmr3: the replay of ``runtime_events``, when the caller has it already.
    """
    if rtmr3 is None:
        rtmr3 = replay(runtime_events, RUNTIME_IMR)
    return _mr_aggregated(report, rtmr3)


def mr_system(report: SignedRegisters, events: Sequence[TdxEvent]) -> bytes:
    """``sha256(mrtd || rtmr0..2 || sha256(key-provider payload) or 32 zero bytes)``."""
    return _mr_system(report, boot_event_payload(events, "key-provider"))


def identity_payloads(events: Iterable[TdxEvent]) -> dict[str, bytes]:
    """The first payload of each :data:`IDENTITY_EVENTS` name among the RTMR3 events before
    the first ``system-ready``; names that do not occur there are absent."""
    found: dict[str, bytes] = {}
    for event in events:
        if event.imr != RUNTIME_IMR:
            continue
        if event.event == SYSTEM_READY:
            break
        if event.event in IDENTITY_EVENTS:
            found.setdefault(event.event, event.event_payload)
    return found


def app_info_of(
    report: SignedRegisters, rtmr3: bytes, identity: Mapping[str, bytes], os_image_hash: bytes
) -> AppInfo:
    """Every identity value of the app, from the TD report, the RTMR3 the runtime log
    replays to, :func:`identity_payloads` of that log and the OS image hash
    (:func:`os_image_hash_from_vm_config`)."""
    return AppInfo(
        app_id=identity.get("app-id", b""),
        compose_hash=identity.get("compose-hash", b""),
        instance_id=identity.get("instance-id", b""),
        device_id=DEVICE_ID_UNVERIFIED,
        mr_aggregated=_mr_aggregated(report, rtmr3),
        mr_system=_mr_system(report, identity.get("key-provider")),
        os_image_hash=os_image_hash,
        key_provider_info=identity.get("key-provider", b""),
    )


def derive_app_info(
    report: SignedRegisters, events: Sequence[TdxEvent], vm_config: str,
    rtmr3: bytes | None = None,
) -> AppInfo:
    """Every identity value of the app, from the quote's TD report and the full event log.

    :param rtmr3: the replay of the log's RTMR3 events, when the caller has it already.
    """
    runtime = [e for e in events if e.imr == RUNTIME_IMR]
    return app_info_of(
        report,
        rtmr3 if rtmr3 is not None else replay(runtime, RUNTIME_IMR),
        identity_payloads(runtime),
        os_image_hash_from_vm_config(vm_config),
    )
