"""A deliberately flexible CBOR writer for tests: the same value in encodings that are
valid CBOR but not canonical (RFC 8949 section 4.2), to prove a strict decoder refuses
them. Written from the RFC, not from cbor2. Part of the kit: the verifier conformance
suite's envelope mutations use it (:mod:`dstack_core.testing.mutations`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cbor2

__all__ = ["encode", "variants", "with_duplicate"]


def _head(major: int, value: int, *, wide: bool = False) -> bytes:
    """Major type and argument; ``wide`` uses one size more than needed."""
    if value < 24 and not wide:
        return bytes([major << 5 | value])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size) and (not wide or size > _min_size(value)):
            return bytes([major << 5 | info]) + value.to_bytes(size, "big")
    raise ValueError("integer too large")


def _min_size(value: int) -> int:
    if value < 24:
        return 0
    for size in (1, 2, 4, 8):
        if value < 1 << (8 * size):
            return size
    raise ValueError("integer too large")


def encode(value: Any, *, style: str = "", at: str = "", path: str = "") -> bytes:
    """Encode ``value`` canonically except at the item whose path equals ``at`` (``""``
    = the top), where ``style`` applies: ``wide`` (a longer head), ``indefinite`` (an
    indefinite-length string, array or map), ``unsorted`` (map keys reversed)."""
    mine = style if path == at else ""
    if isinstance(value, cbor2.CBORTag):
        return _head(6, value.tag) + encode(value.value, style=style, at=at, path=path)
    if isinstance(value, bool):
        return b"\xf5" if value else b"\xf4"
    if isinstance(value, int):
        if value >= 0:
            return _head(0, value, wide=mine == "wide")
        return _head(1, -1 - value, wide=mine == "wide")
    if isinstance(value, (bytes, str)):
        major = 2 if isinstance(value, bytes) else 3
        raw = value if isinstance(value, bytes) else value.encode()
        if mine == "indefinite":
            half = len(raw) // 2
            chunks = [raw[:half], raw[half:]]
            return bytes([major << 5 | 31]) + b"".join(
                _head(major, len(c)) + c for c in chunks
            ) + b"\xff"
        return _head(major, len(raw), wide=mine == "wide") + raw
    if isinstance(value, (list, tuple)):
        items = b"".join(
            encode(v, style=style, at=at, path=f"{path}/{i}") for i, v in enumerate(value)
        )
        if mine == "indefinite":
            return b"\x9f" + items + b"\xff"
        return _head(4, len(value), wide=mine == "wide") + items
    if isinstance(value, Mapping):
        pairs = [
            (encode(k), encode(v, style=style, at=at, path=f"{path}/{k}"))
            for k, v in value.items()
        ]
        pairs.sort(key=lambda kv: (len(kv[0]), kv[0]), reverse=mine == "unsorted")
        body = b"".join(k + v for k, v in pairs)
        if mine == "indefinite":
            return b"\xbf" + body + b"\xff"
        return _head(5, len(pairs), wide=mine == "wide") + body
    raise TypeError(f"cannot encode {type(value).__name__}")


def with_duplicate(data_map: Mapping[str, Any], key: str, first: Any) -> bytes:
    """A map (inside the self-describe tag) where ``key`` appears twice: ``first``, then its
    real value (a last-wins decoder sees the real one, a first-wins decoder ``first``)."""
    items = sorted(data_map.items(), key=lambda kv: (len(encode(kv[0])), encode(kv[0])))
    body = b""
    for k, v in items:
        if k == key:
            body += encode(k) + encode(first)
        body += encode(k) + encode(v)
    return encode(cbor2.CBORTag(55799, 0))[:-1] + _head(5, len(items) + 1) + body


def variants(doc: Mapping[str, Any]) -> dict[str, bytes]:
    """Non-canonical encodings of the tagged envelope map ``doc``, by name."""
    tagged = cbor2.CBORTag(55799, dict(doc))
    out = {
        "wide version": encode(tagged, style="wide", at="/version"),
        "wide map head": encode(tagged, style="wide", at=""),
        "wide quote length": encode(tagged, style="wide", at="/quote"),
        "wide text length": encode(tagged, style="wide", at="/platform"),
        "indefinite map": encode(tagged, style="indefinite", at=""),
        "indefinite quote": encode(tagged, style="indefinite", at="/quote"),
        "indefinite event log": encode(tagged, style="indefinite", at="/event_log"),
        "unsorted keys": encode(tagged, style="unsorted", at=""),
        "duplicate platform": with_duplicate(doc, "platform", "tdx"),
        "duplicate report_data": with_duplicate(doc, "report_data", bytes(64)),
    }
    if doc.get("event_log"):
        out["wide event imr"] = encode(tagged, style="wide", at="/event_log/0/imr")
        out["unsorted event keys"] = encode(tagged, style="unsorted", at="/event_log/0")
    return out
