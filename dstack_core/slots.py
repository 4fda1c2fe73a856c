"""Filling instances of slotted attrs classes on hot paths, without their ``__init__``.

A few values are built thousands of times a second from data already checked (a decoded
event whose every field was tested inline, a check result whose name and status were
looked up): there, attrs' generated ``__init__`` with its validator calls is a measurable
share of a verification. Such code makes the instance with ``object.__new__`` and fills its
slots with the setters from :func:`slot_setters`, which call the slot descriptors
directly (``object.__setattr__`` looks the descriptor up on every call, and frozen classes
refuse plain assignment). Each caller's tests hold its fast path to the validating
constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["slot_setters"]


def slot_setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The setters of the slots ``names`` of the slotted class ``cls``, in that order.

    :raises KeyError: ``cls`` has no slot of that name (e.g. it is not slotted).
    """
    return tuple(cls.__dict__[name].__set__ for name in names)
