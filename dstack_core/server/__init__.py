"""HTTP front end: the aiohttp app (``app``), request codec (``codec``) and runner (``run``)."""

from __future__ import annotations

from .app import create_app
from .run import serve

__all__ = ["create_app", "serve"]
