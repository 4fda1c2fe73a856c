"""The app inputs dstack's boot process provisions: app-compose and sys-config documents.

Platforms that stand in for that boot process (the simulator, the fake kernels, the test
kit) write defaults when the operator gives none; they all build them here.
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

__all__ = [
    "DEFAULT_MEMORY_SIZE",
    "AppComposeFlags",
    "app_compose_document",
    "sys_config_document",
    "document_text",
]

DEFAULT_MEMORY_SIZE: Final = 2 * 1024**3


def app_compose_document(name: str) -> dict[str, Any]:
    """A minimal app-compose (manifest v2, no services) for an app called ``name``."""
    return {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": "services: {}\n",
        "kms_enabled": False,
        "gateway_enabled": False,
        "public_logs": True,
        "public_sysinfo": True,
        "public_tcbinfo": True,
    }


def sys_config_document(
    *, os_image_hash: str, cpu_count: int = 1, memory_size: int = DEFAULT_MEMORY_SIZE
) -> dict[str, Any]:
    """A sys-config without KMS or gateway; ``vm_config`` is a JSON *string*, as upstream's."""
    vm_config = {"os_image_hash": os_image_hash, "cpu_count": cpu_count, "memory_size": memory_size}
    return {
        "kms_urls": [],
        "gateway_urls": [],
        "pccs_url": "",
        "docker_registry": "",
        "host_api_url": "",
        "vm_config": json.dumps(vm_config, separators=(",", ":")),
    }


def document_text(doc: dict[str, Any]) -> str:
    """How the defaults are written to disk: 2-space indented JSON and a final newline."""
    return json.dumps(doc, indent=2) + "\n"


@attrs.frozen(kw_only=True)
class AppComposeFlags:
    """The app-compose switches that govern the external port (upstream's defaults)."""

    public_tcbinfo: bool = True
    public_sysinfo: bool = False
    public_logs: bool = False

    @classmethod
    def from_text(cls, app_compose: str) -> AppComposeFlags:
        """Read the flags; absent or non-boolean values keep upstream's defaults."""
        try:
            doc = json.loads(app_compose)
        except ValueError:
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        defaults = cls()
        return cls(**{
            field.name: value if isinstance(value := doc.get(field.name), bool)
            else getattr(defaults, field.name)
            for field in attrs.fields(cls)
        })
