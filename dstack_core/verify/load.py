"""Recognising and decoding evidence inputs: :func:`load_evidence` and
:func:`evidence_from_json`.

The kind is recognised from the content, never from a file name: our CBOR envelope, upstream
V0 (SCALE) and V1 (MessagePack) envelopes, a bare TDX quote, the JSON body of a GetQuote /
Attest response (or of an upstream ``/verify`` request), an RA-TLS certificate chain in PEM
or DER, or hex text of any binary form. The platform evidence inside is decoded by the
verifier plugin of its format (:mod:`dstack_core.verify.host`).
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import attrs
from cryptography import x509

from .. import strictjson
from ..certs import RaTlsCertificate, load_certificate_chain
from ..envelope import ENVELOPE_MAGIC, Envelope
from ..errors import EvidenceError
from ..eventlog import RUNTIME_EVENT_TYPE, RUNTIME_IMR, ZERO_REGISTER, TdxEvent, events_from_json
from ..quote import is_tdx_quote
from ..types import REPORT_DATA_LENGTH
from ..upstream import decode_attestation, is_upstream_attestation
from .evidence import Evidence, embedded, from_envelope, from_quote, from_upstream
from .host import VerifierHost

__all__ = [
    "MAX_EVIDENCE_SIZE",
    "InputKind",
    "decode_hex",
    "evidence_from_json",
    "is_hex_text",
    "load_evidence",
    "sniff_evidence",
]

MAX_EVIDENCE_SIZE: Final = 24 * 1024 * 1024
"""Evidence inputs over 24 MiB (a 10 MiB envelope as hex inside JSON fits) are refused."""

InputKind = Literal[
    "dstack-core",
    "upstream-v0",
    "upstream-v1",
    "quote",
    "certificate-pem",
    "certificate-der",
    "json",
    "hex",
]

_HEX_PREFIXES: Final = (b"0x", b"0X")
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_ASCII_WHITESPACE: Final = b" \t\n\r\x0b\x0c"
_PEM_START: Final = b"-----BEGIN"
_PEM_CERTIFICATE: Final = b"-----BEGIN CERTIFICATE-----"
_DER_SEQUENCE: Final = 0x30
_JSON_OBJECT: Final = b"{"


def sniff_evidence(data: bytes) -> InputKind:
    """Recognise an evidence input by its first bytes.

    Binary forms first (our CBOR tag ``d9 d9 f7``, V0's ``00``, a MessagePack map, a TDX
    quote header), then text (PEM, a JSON object, hex, PEM blocks inside other ASCII text),
    then DER (``30``: hex text can start with the ASCII ``0`` = ``0x30``, so DER is tried
    last).

    :raises EvidenceError: empty or unrecognisable input.
    """
    if not data:
        raise EvidenceError("empty evidence")
    if data.startswith(ENVELOPE_MAGIC):
        return "dstack-core"
    if is_upstream_attestation(data):
        return "upstream-v0" if data[0] == 0 else "upstream-v1"
    if is_tdx_quote(data):
        return "quote"
    text = data.strip()
    if text.startswith(_PEM_START):
        return "certificate-pem"
    if text.startswith(_JSON_OBJECT):
        return "json"
    if is_hex_text(text):
        return "hex"
    if data.isascii() and _PEM_CERTIFICATE in data:
        return "certificate-pem"  # PEM blocks inside other text (openssl s_client output)
    if data[0] == _DER_SEQUENCE:
        return "certificate-der"
    raise EvidenceError(
        "unrecognised evidence: expected a CBOR, V0 or V1 envelope, a TDX quote, a PEM or DER "
        "certificate, a GetQuote/Attest JSON body, or hex of one of these"
    )


def load_evidence(data: bytes | str, *, host: VerifierHost | None = None) -> Evidence:
    """Decode evidence of any supported kind, recognised from its content.

    :param data: at most :data:`MAX_EVIDENCE_SIZE` bytes (text is UTF-8 encoded first).
    :param host: the verifier plugins to decode platform evidence with (default: the
        installed ones).
    :raises EvidenceError: malformed input of any kind (the message says what is wrong), or
        ``code="unsupported_evidence"`` for a recognised but unsupported platform, or an
        evidence format no installed plugin verifies.
    """
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise EvidenceError("evidence text is not valid Unicode") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"evidence must be bytes or str, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_EVIDENCE_SIZE:
        raise EvidenceError(f"evidence is {len(data)} bytes, over the {MAX_EVIDENCE_SIZE} limit")
    return _load(data, host, allow_text=True)


def _load(data: bytes, host: VerifierHost | None, *, allow_text: bool) -> Evidence:
    kind = sniff_evidence(data)
    if kind in ("dstack-core", "upstream-v0", "upstream-v1"):
        return _load_attestation(data, host)
    if kind == "quote":
        return from_quote(data, None, None, "", host=host)
    if kind == "certificate-der":
        return _from_certificates(_der_certificate(data), host)
    if not allow_text:
        raise EvidenceError(f"{kind} evidence is not allowed here; expected binary evidence")
    if kind == "certificate-pem":
        return _from_certificates(load_certificate_chain(data), host)
    if kind == "json":
        return evidence_from_json(_json_object(data), host=host)
    return _load(decode_hex(data, "evidence"), host, allow_text=False)


def _der_certificate(data: bytes) -> list[x509.Certificate]:
    # Not certs.load_certificate_chain: an RA-TLS leaf embeds a quote whose PCK chain is
    # PEM text, so "contains -----BEGIN" does not mean "is PEM".
    try:
        return [x509.load_der_x509_certificate(data)]
    except (ValueError, x509.InvalidVersion) as exc:
        raise EvidenceError(f"not a DER certificate: {exc}") from None


def is_hex_text(text: bytes) -> bool:
    """Whether ``text`` (stripped) is an even number of hex digits, whitespace allowed
    anywhere, after an optional ``0x``. Deleting the hex digits and whitespace leaves only
    the other bytes, so hex text costs no copy."""
    if not text:
        return False
    rest = text.translate(None, _HEX_DIGITS + _ASCII_WHITESPACE)
    if rest and not (rest in (b"x", b"X") and text[:2] in _HEX_PREFIXES):
        return False
    whitespace = sum(text.count(bytes([c])) for c in _ASCII_WHITESPACE)
    digits = len(text) - whitespace - len(rest) * 2
    return digits > 0 and digits % 2 == 0


def decode_hex(text: bytes | str, what: str) -> bytes:
    """Hex text (whitespace allowed anywhere, optional ``0x``) to bytes, in linear time and
    memory: no regex (a repeated group over megabytes backtracks into gigabytes), and no
    copy of the input unless it holds whitespace or a prefix.

    :raises EvidenceError: not ASCII, empty, odd-length or other than hex digits.
    """
    digits: bytes | str = text
    try:
        if isinstance(text, str):
            if any(c in text for c in _ASCII_WHITESPACE.decode()):
                digits = text.encode("ascii").translate(None, _ASCII_WHITESPACE)
        elif any(bytes([c]) in text for c in _ASCII_WHITESPACE):
            digits = text.translate(None, _ASCII_WHITESPACE)
        if digits[:2] in ("0x", "0X", *_HEX_PREFIXES):
            digits = digits[2:]
        if not digits:
            raise ValueError("empty")
        return binascii.a2b_hex(digits)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise EvidenceError(f"{what} is not an even-length hex string") from None


def _load_attestation(data: bytes, host: VerifierHost | None) -> Evidence:
    """An envelope of one of the three formats (ours, V0, V1)."""
    if data.startswith(ENVELOPE_MAGIC):
        return from_envelope(Envelope.from_cbor(data), host)
    if is_upstream_attestation(data):
        return from_upstream(decode_attestation(data), host)
    raise EvidenceError("not an attestation envelope (CBOR, V0 SCALE or V1 MessagePack)")


def _quote_with_json_log(
    quote: bytes,
    events: Sequence[Any] | None,
    report_data: bytes | None,
    vm_config: str,
    host: VerifierHost | None,
) -> Evidence:
    # The quote first: a malformed quote is what the error names, whatever the log holds.
    bare = from_quote(quote, None, report_data, vm_config, host=host)
    if events is None:
        return bare
    event_log, unreplayable = _json_events(events)
    preimages = tuple(_json_preimage(e, i) for i, e in enumerate(events))
    return attrs.evolve(
        bare, event_log=event_log, event_log_given=True, unreplayable=unreplayable,
        preimages=preimages,
    )


def _json_events(events: Sequence[Any]) -> tuple[tuple[TdxEvent, ...], tuple[str, ...]]:
    """:func:`~dstack_core.eventlog.events_from_json`, except that an event whose digest
    is not the 48 bytes a replay needs (GetQuote sends runtime events with ``"digest": ""``,
    so one retyped by hand arrives so) is kept with a zero digest and described, so that the
    verdict names it (``event_log``) instead of the whole evidence being refused."""
    kept: list[Any] = []
    problems: list[str] = []
    for index, item in enumerate(events):
        if isinstance(item, Mapping) and _unreplayable_digest(item):
            where = f"imr {item['imr']}, type {item['event_type']:#010x}"
            size = len(item["digest"]) // 2
            problems.append(
                f"event {index} ({where}) has a {size}-byte digest: it cannot be replayed"
            )
            item = {**item, "digest": ZERO_REGISTER.hex()}
        kept.append(item)
    return events_from_json(kept), tuple(problems)


def _unreplayable_digest(item: Mapping[str, Any]) -> bool:
    """A well-typed JSON event whose hex digest is not 48 bytes, unless it is a runtime
    event's empty digest (recomputed from its content)."""
    imr, event_type, digest = item.get("imr"), item.get("event_type"), item.get("digest")
    if type(imr) is not int or type(event_type) is not int or not isinstance(digest, str):
        return False
    text = digest[2:] if digest[:2] in ("0x", "0X") else digest
    if text and not is_hex_text(text.encode("ascii", "replace")):
        return False  # not hex at all: malformed, as events_from_json says
    if len(text) == 2 * len(ZERO_REGISTER):
        return False
    return not (text == "" and imr == RUNTIME_IMR and event_type == RUNTIME_EVENT_TYPE)


def _json_preimage(event: Any, index: int) -> bytes | None:
    value = event.get("preimage") if isinstance(event, Mapping) else None
    if value is None:
        return None
    return decode_hex(_expect_str(value, f"event {index} preimage"), f"event {index} preimage")


def _from_certificates(chain: Sequence[x509.Certificate], host: VerifierHost | None) -> Evidence:
    if not chain:
        raise EvidenceError("empty certificate chain")
    leaf = RaTlsCertificate.from_certificate(chain[0])
    if leaf.attestation is not None:
        inner = _load_attestation(leaf.attestation, host)
        attestation_kind: str = inner.kind
    elif leaf.legacy_quote is not None:
        if leaf.legacy_event_log is None:
            raise EvidenceError("legacy RA-TLS certificate has a quote but no event log")
        try:
            events = strictjson.loads(leaf.legacy_event_log)
        except ValueError as exc:
            raise EvidenceError(f"legacy event log extension is not JSON: {exc}") from None
        if not isinstance(events, list):
            raise EvidenceError("legacy event log extension is not a JSON array")
        inner = _quote_with_json_log(leaf.legacy_quote, events, None, "", host)
        attestation_kind = "legacy-quote"
    else:
        raise EvidenceError("the certificate carries no RA-TLS attestation extension")
    return embedded(inner, leaf, chain, attestation_kind)


def _json_object(data: bytes) -> Mapping[str, Any]:
    try:
        doc = strictjson.loads(data)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise EvidenceError(f"evidence is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EvidenceError("JSON evidence must be an object")
    return doc


def _expect_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise EvidenceError(f"{what} must be a string, not {type(value).__name__}")
    return value


def evidence_from_json(doc: Mapping[str, Any], *, host: VerifierHost | None = None) -> Evidence:
    """Evidence from a decoded JSON object: a GetQuote, Attest or GetTlsKey response, or an
    upstream ``/verify`` request body.

    As upstream does, a non-empty ``attestation`` (hex of any envelope format) wins and the
    other fields are ignored; otherwise ``quote`` (hex) with an optional ``event_log`` (the
    JSON text GetQuote returns, or an array), ``report_data`` and ``vm_config``; otherwise
    ``certificate_chain`` (PEM strings, leaf first). Unknown keys are ignored.

    :raises EvidenceError: none of these, or any of them malformed.
    """
    attestation = doc.get("attestation")
    if attestation:
        raw = decode_hex(_expect_str(attestation, "attestation"), "attestation")
        return _load_attestation(raw, host)
    quote = doc.get("quote")
    if quote:
        quote_bytes = decode_hex(_expect_str(quote, "quote"), "quote")
        events: Sequence[Any] | None = None
        log = doc.get("event_log")
        if isinstance(log, str) and log.strip():
            try:
                decoded = strictjson.loads(log)
            except ValueError as exc:
                raise EvidenceError(f"event_log is not valid JSON: {exc}") from None
            if not isinstance(decoded, list):
                raise EvidenceError("event_log must be a JSON array")
            events = decoded
        elif isinstance(log, list):
            events = log
        elif log not in (None, ""):
            raise EvidenceError("event_log must be a JSON string or an array")
        report_data = doc.get("report_data")
        claimed = (
            decode_hex(_expect_str(report_data, "report_data"), "report_data")
            if report_data
            else None
        )
        if claimed is not None and len(claimed) != REPORT_DATA_LENGTH:
            raise EvidenceError(f"report_data must be {REPORT_DATA_LENGTH} bytes")
        vm_config = _expect_str(doc.get("vm_config") or "", "vm_config")
        return _quote_with_json_log(quote_bytes, events, claimed, vm_config, host)
    chain = doc.get("certificate_chain")
    if chain:
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise EvidenceError("certificate_chain must be an array of PEM strings")
        return _from_certificates(load_certificate_chain("".join(chain)), host)
    raise EvidenceError(
        "JSON evidence needs a non-empty 'attestation', 'quote' (+ 'event_log') or "
        "'certificate_chain'"
    )
