"""dstack-core: a plugin-based dstack guest agent.

The public API for platform plugin authors: the :data:`hookimpl` marker, the error
hierarchy and the value types that cross the plugin contract.
"""

from __future__ import annotations

import pluggy

from .errors import (
    ConfigurationError,
    DstackError,
    EvidenceError,
    InvalidRequest,
    PlatformBusy,
    PlatformError,
    PlatformUnsupported,
    PluginError,
    StateError,
    StorageError,
)
from .hookspecs import nonblocking
from .types import (
    KeyProvider,
    Measurements,
    PlatformConfig,
    PlatformEvidence,
    PlatformInfo,
    Quote,
    RootKey,
    TrustBundle,
)

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("dstack_core")
"""Marks a platform plugin's hook implementations (``@hookimpl def get_quote(...)``)."""

__all__ = [
    "__version__",
    "hookimpl",
    "nonblocking",
    "ConfigurationError",
    "DstackError",
    "EvidenceError",
    "InvalidRequest",
    "PlatformBusy",
    "PlatformError",
    "PlatformUnsupported",
    "PluginError",
    "StateError",
    "StorageError",
    "KeyProvider",
    "Measurements",
    "PlatformConfig",
    "PlatformEvidence",
    "PlatformInfo",
    "Quote",
    "RootKey",
    "TrustBundle",
]
