"""Strict JSON decoding for untrusted input, in one place.

``json.loads`` alone accepts duplicate keys (the last wins), ``NaN``/``Infinity``, and
turns deep nesting or over-long integers into exceptions that are not ``JSONDecodeError``.
:func:`loads` refuses the first two and reports all of them as :class:`ValueError`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


class _Rejected(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise _Rejected(f"duplicate key {key!r} in a JSON object")
        doc[key] = value
    return doc


def _reject_constant(name: str) -> Any:
    raise _Rejected(f"{name} is not valid JSON")


# One decoder for every call: json.loads with hooks would build a new one each time.
_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def loads(text: str | bytes | bytearray) -> Any:
    """Decode one JSON document strictly.

    :raises ValueError: invalid JSON or UTF-8, duplicate keys, NaN/Infinity, nesting too
        deep for the parser, or an integer longer than Python will convert.
    """
    try:
        # Decode bytes ourselves: json.loads would sniff UTF-16/32 and skip a BOM.
        doc = text if isinstance(text, str) else str(text, "utf-8")
        if doc.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", doc, 0)
        return _DECODER.decode(doc)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("JSON text is not UTF-8") from None
    except (json.JSONDecodeError, _Rejected):
        raise
    except ValueError:
        # Python refuses integers longer than sys.get_int_max_str_digits() (4300 by default).
        raise ValueError("JSON integer too long to decode") from None
