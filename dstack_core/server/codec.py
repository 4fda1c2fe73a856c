"""Request decoding for the pRPC-over-HTTP wire format, strictly typed.

Rules (agent-api.md section 2.3, our deliberate differences in docs/api.md):

* POST bodies are a JSON object; an empty body means "all defaults". GET takes the same
  fields from the query string (``alt_names[0]=a``, ``alt_names[]=a`` or repeated keys).
* Missing fields take their defaults; unknown fields are ignored, as upstream does.
* Types are checked: strings must be strings, booleans booleans, integers non-negative
  integers. ``bytes`` fields are hex strings; a leading ``0x`` and upper case are accepted.
* Anything else is :class:`~dstack_core.errors.InvalidRequest` naming the field.
* A body may be sent with ``Content-Encoding: gzip`` or ``deflate`` (or ``identity``); other
  codings are 415, a body that does not decode is 400, and the size limit holds for the
  decoded body too.
"""

from __future__ import annotations

import binascii
import re
import zlib
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
from multidict import MultiMapping

from .. import strictjson
from ..errors import (
    InvalidContentEncoding,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedContentEncoding,
)
from ..jsonout import encode_json

__all__ = [
    "CONTENT_CODINGS",
    "Field",
    "Schema",
    "decode_args",
    "decode_content",
    "parse_json_body",
    "parse_query",
    "to_json_bytes",
]

Kind = Literal["str", "bytes", "bool", "u64", "str_list"]
U64_MAX: Final = 2**64 - 1
U64_DIGITS: Final = len(str(U64_MAX))
_INDEXED_KEY: Final = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\[(?P<index>[0-9]*)\]$")
_ASCII_DIGITS: Final = re.compile(r"[0-9]+")


@attrs.frozen
class Field:
    """One request field: its wire name, kind and default (``None`` only for ``u64``)."""

    name: str
    kind: Kind
    default: Any = None

    def decode(self, value: Any) -> Any:
        if self.kind == "u64" and value is None:
            return None
        decoder = _DECODERS[self.kind]
        return decoder(self.name, value)

    def default_value(self) -> Any:
        if self.default is not None or self.kind == "u64":
            return self.default
        return {"str": "", "bytes": b"", "bool": False, "str_list": ()}[self.kind]


Schema = tuple[Field, ...]


def _bad(name: str, expected: str, value: Any) -> InvalidRequest:
    got = "null" if value is None else type(value).__name__
    return InvalidRequest(f"invalid type for field {name!r}: expected {expected}, got {got}")


def _decode_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(name, "a string", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON "\ud800" escapes decode to lone surrogates, which no UTF-8 consumer accepts.
        raise InvalidRequest(f"field {name!r} is not valid Unicode (lone surrogate)") from None
    return value


def _decode_bytes(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise _bad(name, "a hex string", value)
    text = value
    while text.startswith("0x"):
        text = text[2:]
    if len(text) % 2:
        raise InvalidRequest(f"invalid hex in field {name!r}: odd number of digits", code="invalid_hex")
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"invalid hex in field {name!r}", code="invalid_hex") from None


def _decode_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "a boolean", value)
    return value


def _decode_u64(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "an unsigned integer", value)
    if not 0 <= value <= U64_MAX:
        raise InvalidRequest(f"field {name!r} is out of range for an unsigned 64-bit integer")
    return value


def _decode_str_list(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _bad(name, "a list of strings", value)
    return tuple(_decode_str(f"{name}[]", item) for item in value)


_DECODERS: Final = {
    "str": _decode_str,
    "bytes": _decode_bytes,
    "bool": _decode_bool,
    "u64": _decode_u64,
    "str_list": _decode_str_list,
}


# zlib window bits: gzip wrapper, zlib wrapper (RFC 9110 "deflate"), and raw deflate, which
# some clients send as "deflate" too.
_GZIP: Final = 16 + zlib.MAX_WBITS
_ZLIB: Final = zlib.MAX_WBITS
_RAW_DEFLATE: Final = -zlib.MAX_WBITS
CONTENT_CODINGS: Final = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}
"""The ``Content-Encoding`` codings a request body may use, besides ``identity``."""


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise PayloadTooLarge(f"decoded request body is larger than {limit} bytes")
        if inflater.unconsumed_tail or not inflater.eof:
            raise zlib.error("truncated stream")
        data = inflater.unused_data
        # gzip allows several members back to back; anything else after the end is junk.
        if not data or wbits != _GZIP:
            break
    if data:
        raise zlib.error("data after the end of the stream")
    return bytes(out)


def decode_content(body: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (a comma-separated list, applied in order) on ``body``.

    :raises UnsupportedContentEncoding: a coding other than gzip, deflate or identity.
    :raises InvalidContentEncoding: the body is not what its coding says.
    :raises PayloadTooLarge: the decoded body is over ``limit`` bytes.
    """
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if any(c not in CONTENT_CODINGS for c in codings):
        raise UnsupportedContentEncoding(
            "unsupported Content-Encoding; use gzip, deflate or identity"
        )
    for coding in reversed(codings):
        wbits = CONTENT_CODINGS[coding]
        try:
            try:
                body = _inflate(body, wbits, limit)
            except zlib.error:
                if wbits != _ZLIB:
                    raise
                body = _inflate(body, _RAW_DEFLATE, limit)
        except zlib.error:
            raise InvalidContentEncoding(f"request body is not valid {coding} data") from None
    return body


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Decode a POST body: empty means ``{}``; otherwise exactly one JSON object."""
    if not body.strip():
        return {}
    try:
        doc = strictjson.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise InvalidRequest(
            f"request body must be a JSON object, got {type(doc).__name__}", code="invalid_json"
        )
    return doc


def parse_query(query: MultiMapping[str], schema: Schema) -> dict[str, Any]:
    """Turn a query string into the JSON-shaped values ``decode_args`` expects."""
    kinds = {f.name: f.kind for f in schema}
    doc: dict[str, Any] = {}
    lists: dict[str, list[tuple[int, str]]] = {}
    for position, (raw_key, value) in enumerate(query.items()):
        match = _INDEXED_KEY.match(raw_key)
        key = match["name"] if match else raw_key
        kind = kinds.get(key)
        if kind is None:
            continue
        if kind == "str_list":
            if match and len(match["index"]) > U64_DIGITS:
                raise InvalidRequest(f"list index for field {key!r} is out of range")
            index = int(match["index"]) if match and match["index"] else position
            lists.setdefault(key, []).append((index, value))
        elif key in doc:
            raise InvalidRequest(f"duplicate field {key!r} in the query string")
        elif kind == "bool":
            if value not in ("true", "false", "1", "0"):
                raise InvalidRequest(f"invalid boolean for field {key!r}: {value!r}")
            doc[key] = value in ("true", "1")
        elif kind == "u64":
            if not _ASCII_DIGITS.fullmatch(value):
                raise InvalidRequest(f"invalid unsigned integer for field {key!r}: {value!r}")
            if len(value.lstrip("0")) > U64_DIGITS:
                raise InvalidRequest(
                    f"field {key!r} is out of range for an unsigned 64-bit integer"
                )
            doc[key] = int(value)
        else:
            doc[key] = value
    for key, items in lists.items():
        doc[key] = [v for _, v in sorted(items, key=lambda item: item[0])]
    return doc


def decode_args(schema: Schema, doc: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a schema: typed values for known fields, defaults for missing ones."""
    return {
        f.name: f.decode(doc[f.name]) if f.name in doc else f.default_value() for f in schema
    }


def to_json_bytes(obj: Any) -> bytes:
    """Compact, ASCII-only JSON (non-ASCII escaped) as the JS SDK needs it."""
    return encode_json(obj)
