"""JSON the agent sends: compact, ASCII-only, and encoded once when it is large.

Every response body is compact JSON with non-ASCII escaped (the JS SDK needs ASCII bodies
with a ``Content-Length``). Large values that grow slowly, like the event log a quote
carries, are kept as :class:`EncodedJson` and inserted verbatim, so a request costs what
sending them costs rather than encoding them again.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any, Final

import attrs

__all__ = ["EncodedJson", "encode_json", "escaped"]

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


@attrs.frozen
class EncodedJson:
    """A JSON value already encoded as compact ASCII bytes.

    :ivar data: the encoded value (for a string: the quotes and escapes included).
    """

    data: bytes = attrs.field(repr=False)

    @classmethod
    def string(cls, pieces: Iterable[bytes | memoryview]) -> EncodedJson:
        """The JSON string whose escaped content (:func:`escaped`) is ``pieces`` joined."""
        return cls(b"".join((b'"', *pieces, b'"')))

    @classmethod
    def hex(cls, data: bytes) -> EncodedJson:
        """The JSON string of ``data`` in lower-case hex (which needs no escaping)."""
        return cls(b'"' + binascii.hexlify(data) + b'"')

    def decode(self) -> Any:
        """The value as Python objects."""
        return json.loads(self.data)


def escaped(text: str) -> bytes:
    """``text`` as it appears inside a JSON string: ASCII, escaped, without the quotes.

    Escaping works character by character, so the escape of a concatenation is the
    concatenation of the escapes.
    """
    return encode_basestring_ascii(text)[1:-1].encode("ascii")


def encode_json(obj: Any) -> bytes:
    """Compact ASCII JSON of ``obj``; an :class:`EncodedJson`, or one as a value of a
    top-level object, is inserted as it is."""
    if isinstance(obj, EncodedJson):
        return obj.data
    if isinstance(obj, Mapping) and any(isinstance(v, EncodedJson) for v in obj.values()):
        parts = []
        for key, value in obj.items():
            encoded = value.data if isinstance(value, EncodedJson) else _encode(value)
            parts.append(_encode(key) + b":" + encoded)
        return b"{" + b",".join(parts) + b"}"
    return _encode(obj)


def _encode(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("ascii")
