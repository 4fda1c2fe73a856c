"""JSON the agent sends: compact, ASCII-only, and encoded once when it is large.

Every response body is compact JSON with non-ASCII escaped (the JS SDK needs ASCII bodies
with a ``Content-Length``). Large values that grow slowly, like the event log a quote
carries, are kept as :class:`EncodedJson` and inserted verbatim, so a request costs what
sending them costs rather than encoding them again.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Final

import attrs

__all__ = ["EncodedJson", "encode_json", "encode_json_parts", "escaped", "text", "text_list"]

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_PLAIN: Final = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\') + b"\n"
"""What JSON's ASCII encoding leaves as it is (and the newline, escaped by hand)."""


@attrs.frozen
class EncodedJson:
    """A JSON value already encoded as compact ASCII bytes, possibly in pieces: a body
    that holds it is joined once, so a large value is copied once per response.

    :ivar parts: the encoded value, split anywhere (for a string: the quotes and escapes
        included); the pieces are never changed.
    """

    parts: tuple[bytes | memoryview, ...] = attrs.field(repr=False)

    @classmethod
    def string(cls, pieces: Iterable[bytes | memoryview]) -> EncodedJson:
        """The JSON string whose escaped content (:func:`escaped`) is ``pieces`` joined."""
        return cls((b'"', *pieces, b'"'))

    @classmethod
    def hex(cls, data: bytes) -> EncodedJson:
        """The JSON string of ``data`` in lower-case hex (which needs no escaping)."""
        return cls((b'"', binascii.hexlify(data), b'"'))

    @property
    def size(self) -> int:
        """The encoded value's length in bytes."""
        return sum(part.nbytes if part.__class__ is memoryview else len(part)
                   for part in self.parts)

    @property
    def data(self) -> bytes:
        """The encoded value in one piece."""
        return self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], bytes) \
            else b"".join(self.parts)

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
    return encode_json_parts(obj).data


def encode_json_parts(obj: Any) -> EncodedJson:
    """:func:`encode_json` without joining: kept pieces of ``obj`` (an :class:`EncodedJson`
    or such values of a top-level object) stay pieces, for a writer that sends them one by
    one instead of copying megabytes into one buffer first."""
    if obj.__class__ is EncodedJson:
        encoded: EncodedJson = obj
        return encoded
    if obj.__class__ is dict:
        for value in obj.values():
            if value.__class__ is EncodedJson:
                return _encode_object(obj)
    return EncodedJson((_encode(obj),))


def _encode_object(obj: dict[str, Any]) -> EncodedJson:
    parts: list[bytes | memoryview] = []
    for key, value in obj.items():
        parts.append(b"," + _encode(key) + b":")
        if value.__class__ is EncodedJson:
            parts.extend(value.parts)
        else:
            parts.append(_encode(value))
    parts[0] = b"{" + parts[0][1:]
    parts.append(b"}")
    return EncodedJson(tuple(parts))


def text(value: str) -> EncodedJson:
    """The JSON string of ``value``: for long printable ASCII with newlines (PEM) much
    faster than json's encoder, which goes character by character."""
    return EncodedJson((_encode_text(value),))


def text_list(values: Iterable[str]) -> EncodedJson:
    """The JSON array of strings ``values``, each as :func:`text` encodes it."""
    return EncodedJson((b"[" + b",".join(_encode_text(v) for v in values) + b"]",))


def _encode_text(text: str) -> bytes:
    """A JSON string, fast for printable ASCII with newlines (PEM): only the newlines need
    escaping, which bytes methods do at memory speed, where json's encoder goes character
    by character. Anything else takes the encoder."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return _encode(text)
    if raw.translate(None, _PLAIN):  # something other than plain characters and newlines
        return _encode(text)
    return b'"' + raw.replace(b"\n", b"\\n") + b'"'


def _encode(obj: Any) -> bytes:
    if _C_ENCODE is None:
        return _ENCODER.encode(obj).encode("ascii")
    return "".join(_C_ENCODE(obj, 0)).encode("ascii")


def _unencodable(obj: Any) -> Any:
    raise TypeError(f"Object of type {obj.__class__.__name__} is not JSON serializable")


# The C encoder JSONEncoder.encode builds per call, built once (a third of a small body's
# cost); no circular-reference markers: what we encode is a tree.
_C_ENCODE: Final = None if c_make_encoder is None else c_make_encoder(
    None, _unencodable, encode_basestring_ascii, None, ":", ",", False, False, True
)
