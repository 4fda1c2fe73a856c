"""The app identity and OS image that the replayed registers bind, for formats with
dstack's registers: app id, compose hash, key provider, ``mr_system``, ``mr_aggregated``,
init script hashes, the ``os-image-hash`` event and the OS image policy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from .. import strictjson
from ..appinfo import SYSTEM_READY, boot_event_payload, derive_app_info
from ..envelope import AppInfo
from ..errors import EvidenceError
from ..eventlog import TdxEvent
from ..osimage import OsImageOutcome, check_os_image, stated_os_image_hash
from .checks import Outcome
from .evidence import Evidence
from .options import VerifyOptions
from .replay import Binding
from .types import Registers

__all__ = ["OS_IMAGE_HASH_EVENT", "BoundIdentity", "bound_identity", "identity_claims"]

OS_IMAGE_HASH_EVENT: Final = "os-image-hash"
"""The RTMR3 event dstack-util emits (KMS mode) with the OS image hash the KMS accepted."""


@attrs.frozen(kw_only=True)
class BoundIdentity:
    """What the bound runtime events say, before authentication decides what is a claim.

    :ivar derived: the identity recomputed from the bound runtime events, or None.
    :ivar os_image: the ``os_image`` check's decision.
    :ivar stated: the vm_config's (unbound) OS image hash, or None.
    """

    derived: AppInfo | None
    os_image: OsImageOutcome
    stated: bytes | None

    @property
    def os_image_check(self) -> Outcome:
        return self.os_image.status, self.os_image.detail


def bound_identity(
    evidence: Evidence, registers: Registers, binding: Binding, options: VerifyOptions
) -> BoundIdentity:
    """The identity and OS image the replay binds to ``registers``."""
    runtime = binding.runtime
    # Bound runtime events replay to the signed RTMR3: no need to replay them again.
    derived = None if runtime is None else derive_app_info(registers, runtime, "", registers.rtmr3)
    measured = None if runtime is None else boot_event_payload(runtime, OS_IMAGE_HASH_EVENT)
    try:
        stated, unreadable = stated_os_image_hash(evidence.vm_config), None
    except EvidenceError as exc:
        stated, unreadable = None, exc.message
    os_image = check_os_image(
        options.os_image_policy,
        mrtd=registers.mrtd,
        rtmrs=registers.rtmrs,
        measured=measured,
        stated=stated,
        stated_problem=unreadable,
    )
    return BoundIdentity(derived=derived, os_image=os_image, stated=stated)


def _key_provider(info: bytes) -> Mapping[str, str] | None:
    if not info:
        return None
    try:
        doc = strictjson.loads(info)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("name"), str):
        provider_id = doc.get("id", "")
        return {"name": doc["name"], "id": provider_id if isinstance(provider_id, str) else ""}
    return None


def _init_script_hashes(runtime: Iterable[TdxEvent]) -> tuple[bytes, ...]:
    hashes = []
    for event in runtime:
        if event.event == SYSTEM_READY:
            break
        if event.event == "init-script-hash":
            hashes.append(event.event_payload)
    return tuple(hashes)


def identity_claims(
    identity: AppInfo | None, runtime: Sequence[TdxEvent] | None
) -> dict[str, Any]:
    """The app identity fields of a result: from bound runtime events only, else empty."""
    if identity is None or runtime is None:
        return {}
    return {
        "identity_bound": True,
        "app_id": identity.app_id,
        "compose_hash": identity.compose_hash,
        "instance_id": identity.instance_id,
        "key_provider": _key_provider(identity.key_provider_info),
        "key_provider_info": identity.key_provider_info,
        "mr_aggregated": identity.mr_aggregated,
        "mr_system": identity.mr_system,
        "init_script_hashes": _init_script_hashes(runtime),
        "runtime_events": tuple(e.to_runtime_event() for e in runtime),
    }
