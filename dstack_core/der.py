"""The few DER (X.690 distinguished encoding) builders the core writes by hand.

Pure functions over bytes. They exist for hot paths that would otherwise go through an
object model and back (a GetTlsKey leaf certificate: :func:`dstack_core.certs.issue_certificate`)
and for small fixed structures (the AMD mock PKI's extension values). Each returns one
whole TLV; nothing here parses. The encodings are the minimal ones DER requires, so a
value has exactly one encoding, the one cryptography writes for it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Final

__all__ = [
    "TAG_BOOLEAN",
    "TAG_INTEGER",
    "TAG_BIT_STRING",
    "TAG_OCTET_STRING",
    "TAG_OID",
    "TAG_UTF8_STRING",
    "TAG_IA5_STRING",
    "TAG_UTC_TIME",
    "TAG_GENERALIZED_TIME",
    "TAG_SEQUENCE",
    "TAG_SET",
    "LONG_LENGTH_FLAG",
    "TRUE",
    "tlv",
    "integer",
    "oid",
    "octet_string",
    "bit_string",
    "sequence",
    "utf8_string",
    "ia5_string",
    "time",
    "explicit",
    "implicit",
]

TAG_BOOLEAN: Final = 0x01
TAG_INTEGER: Final = 0x02
TAG_BIT_STRING: Final = 0x03
TAG_OCTET_STRING: Final = 0x04
TAG_OID: Final = 0x06
TAG_UTF8_STRING: Final = 0x0C
TAG_IA5_STRING: Final = 0x16
TAG_UTC_TIME: Final = 0x17
TAG_GENERALIZED_TIME: Final = 0x18
TAG_SEQUENCE: Final = 0x30
TAG_SET: Final = 0x31
#: Context-specific class bits; constructed adds 0x20 (an EXPLICIT tag wraps a whole TLV).
_CONTEXT: Final = 0x80
_CONSTRUCTED: Final = 0x20
#: A length byte with this bit set counts the big-endian length bytes that follow.
LONG_LENGTH_FLAG: Final = 0x80
#: BOOLEAN TRUE (DER requires 0xFF).
TRUE: Final = bytes((TAG_BOOLEAN, 1, 0xFF))

#: RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 (and before 1950).
_UTC_TIME_YEARS: Final = range(1950, 2050)


def _length(length: int) -> bytes:
    if length < LONG_LENGTH_FLAG:
        return bytes((length,))
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((LONG_LENGTH_FLAG | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    """One TLV with a single-byte ``tag`` and a minimal definite length."""
    return bytes((tag,)) + _length(len(content)) + content


def integer(value: int) -> bytes:
    """An INTEGER in the fewest two's-complement bytes (a leading zero byte only where the
    top bit would otherwise read as a sign)."""
    size = (value.bit_length() + 8) // 8 if value >= 0 else ((~value).bit_length() + 8) // 8
    return tlv(TAG_INTEGER, value.to_bytes(size, "big", signed=True))


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form, e.g. ``"1.3.6.1.5.5.7.3.1"``.

    :raises ValueError: fewer than two arcs, or a first pair X.690 cannot encode.
    """
    arcs = [int(part) for part in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40) or min(arcs) < 0:
        raise ValueError(f"not an encodable object identifier: {dotted!r}")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return tlv(TAG_OID, bytes(body))


def octet_string(content: bytes) -> bytes:
    return tlv(TAG_OCTET_STRING, content)


def bit_string(content: bytes, unused_bits: int = 0) -> bytes:
    """A BIT STRING of whole bytes, or with ``unused_bits`` (0-7) trailing bits unused."""
    return tlv(TAG_BIT_STRING, bytes((unused_bits,)) + content)


def sequence(*items: bytes) -> bytes:
    return tlv(TAG_SEQUENCE, b"".join(items))


def utf8_string(text: str) -> bytes:
    return tlv(TAG_UTF8_STRING, text.encode("utf-8"))


def ia5_string(text: str) -> bytes:
    """An IA5String.

    :raises UnicodeEncodeError: ``text`` is not ASCII.
    """
    return tlv(TAG_IA5_STRING, text.encode("ascii"))


def time(moment: datetime) -> bytes:
    """An X.509 ``Time``: UTCTime for 1950-2049, GeneralizedTime otherwise, to the second.

    :param moment: an aware datetime; its microseconds are dropped.
    :raises ValueError: ``moment`` is naive.
    """
    if moment.tzinfo is None:
        raise ValueError("a certificate time must be timezone-aware")
    moment = moment.astimezone(timezone.utc)
    if moment.year in _UTC_TIME_YEARS:
        return tlv(TAG_UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return tlv(TAG_GENERALIZED_TIME, f"{moment.year:04d}{moment:%m%d%H%M%S}Z".encode("ascii"))


def explicit(number: int, inner: bytes) -> bytes:
    """``[number] EXPLICIT``: a constructed context tag around a whole TLV (number < 31)."""
    return tlv(_CONTEXT | _CONSTRUCTED | number, inner)


def implicit(number: int, content: bytes) -> bytes:
    """``[number] IMPLICIT`` of a primitive type: its content under a context tag (< 31)."""
    return tlv(_CONTEXT | number, content)
