"""Quote collateral for Intel DCAP verification: from a file, a cache directory, or a PCCS.

Collateral (TCB info, QE identity, their signatures and issuer chains, the root-CA and PCK
CRLs) is what dcap-qvl needs besides the quote. It is public, signed by Intel (or by the
simulator's mock PKI), and expires: each document and CRL carries a ``nextUpdate``.

This module does all the I/O of verification, *before* it: :func:`load_collateral_file`
reads a ``dcap_qvl.QuoteCollateralV3`` JSON file, :class:`CollateralCache` keeps fetched
collateral per platform (FMSPC and PCK CA) in a directory and forgets it when it expires,
and :class:`CollateralSource` puts the three together, fetching from a configured PCCS with
``dcap_qvl.get_collateral`` only on a cache miss. :mod:`dstack_core.verify` then verifies
purely with the :class:`Collateral` value it is handed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs
import dcap_qvl  # type: ignore[import-untyped]
from cryptography import x509

from .errors import ConfigurationError, EvidenceError
from .statefile import atomic_write

__all__ = [
    "COLLATERAL_FIELDS",
    "DEFAULT_MAX_AGE",
    "MAX_COLLATERAL_SIZE",
    "Collateral",
    "CollateralCache",
    "CollateralSource",
    "collateral_key",
    "fetch_collateral",
    "load_collateral_file",
]

COLLATERAL_FIELDS: Final = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
"""The fields of ``QuoteCollateralV3`` JSON, all required (CRLs and signatures in hex)."""

MAX_COLLATERAL_SIZE: Final = 4 * 1024 * 1024
"""Collateral JSON longer than this (4 MiB) is refused unread."""

DEFAULT_MAX_AGE: Final = 24 * 3600
"""Seconds a fetched collateral is trusted in the cache, even before its ``nextUpdate``:
Intel re-issues TCB info on TCB recoveries without waiting for it."""

_CACHE_FORMAT: Final = "dstack-core/collateral-cache"
_CACHE_VERSION: Final = 1
_KEY_RE: Final = re.compile(r"[a-z]+-[0-9A-F]{12}")
_DATE_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

Fetcher = Callable[[str, bytes], Awaitable[str]]
"""``async fetch(pccs_url, quote) -> collateral JSON text``: the network, injectable."""


def _parse_date(value: Any, where: str) -> int:
    if not isinstance(value, str):
        raise EvidenceError(f"collateral {where} is not a date string")
    try:
        moment = datetime.strptime(value.replace(".000", ""), _DATE_FORMAT)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise EvidenceError(f"collateral {where} is not an RFC 3339 date: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _crl_window(hex_der: Any, where: str) -> tuple[int, int | None]:
    if not isinstance(hex_der, str):
        raise EvidenceError(f"collateral {where} must be a hex string")
    try:
        crl = x509.load_der_x509_crl(bytes.fromhex(hex_der))
    except ValueError as exc:
        raise EvidenceError(f"collateral {where} is not a DER CRL: {exc}") from None
    next_update = crl.next_update_utc
    return (
        int(crl.last_update_utc.timestamp()),
        None if next_update is None else int(next_update.timestamp()),
    )


def _signed_document(text: Any, where: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise EvidenceError(f"collateral {where} must be JSON text")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise EvidenceError(f"collateral {where} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EvidenceError(f"collateral {where} is not a JSON object")
    return doc


@attrs.frozen(kw_only=True)
class Collateral:
    """One set of quote collateral, parsed once.

    :ivar json: the ``QuoteCollateralV3`` JSON text, as dcap-qvl reads and writes it.
    :ivar issued_at: unix seconds; the latest ``issueDate`` / CRL ``thisUpdate`` inside.
    :ivar expires_at: unix seconds; the earliest ``nextUpdate`` inside. Verification at a
        time outside ``[issued_at, expires_at)`` fails in dcap-qvl.
    """

    json: str = attrs.field(repr=False)
    issued_at: int
    expires_at: int
    _qvl: Any = attrs.field(repr=False, eq=False, alias="qvl")

    @classmethod
    def from_json(cls, text: str | bytes) -> Collateral:
        """Parse ``QuoteCollateralV3`` JSON text.

        :raises EvidenceError: oversize, not JSON, a missing field, an unparseable date or
            CRL, or anything dcap-qvl refuses to load.
        """
        if len(text) > MAX_COLLATERAL_SIZE:
            raise EvidenceError(f"collateral is over {MAX_COLLATERAL_SIZE} bytes")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise EvidenceError("collateral is not UTF-8 text") from None
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise EvidenceError(f"collateral is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise EvidenceError("collateral must be a JSON object")
        missing = [name for name in COLLATERAL_FIELDS if name not in doc]
        if missing:
            raise EvidenceError(f"collateral is missing {', '.join(missing)}")
        starts: list[int] = []
        ends: list[int] = []
        for name in ("tcb_info", "qe_identity"):
            signed = _signed_document(doc[name], name)
            starts.append(_parse_date(signed.get("issueDate"), f"{name}.issueDate"))
            ends.append(_parse_date(signed.get("nextUpdate"), f"{name}.nextUpdate"))
        for name in ("root_ca_crl", "pck_crl"):
            start, end = _crl_window(doc[name], name)
            starts.append(start)
            if end is not None:
                ends.append(end)
        try:
            qvl = dcap_qvl.QuoteCollateralV3.from_json(text)
        except (ValueError, TypeError) as exc:
            raise EvidenceError(f"dcap-qvl cannot load the collateral: {exc}") from None
        return cls(json=text, issued_at=max(starts), expires_at=min(ends), qvl=qvl)

    def to_qvl(self) -> Any:
        """The ``dcap_qvl.QuoteCollateralV3`` object (parsed once, shared)."""
        return self._qvl

    def valid_at(self, now: int) -> bool:
        """Whether ``now`` (unix seconds) falls inside the collateral's validity window."""
        return self.issued_at <= now < self.expires_at


def load_collateral_file(path: Path) -> Collateral:
    """Read a ``QuoteCollateralV3`` JSON file (e.g. the simulator's ``collateral.json``).

    :raises ConfigurationError: the file cannot be read.
    :raises EvidenceError: its content is not valid collateral (see :meth:`Collateral.from_json`).
    """
    try:
        if path.stat().st_size > MAX_COLLATERAL_SIZE:
            raise EvidenceError(f"collateral file {path} is over {MAX_COLLATERAL_SIZE} bytes")
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read collateral file {path}: {exc}") from None
    return Collateral.from_json(text)


def collateral_key(quote: bytes) -> str:
    """The cache key of the collateral a quote needs: ``<pck ca>-<FMSPC>``, e.g.
    ``platform-B0C06F000000``. Pure: read from the PCK certificate inside the quote.

    :raises EvidenceError: dcap-qvl cannot parse the quote or find its FMSPC.
    """
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
        key = f"{parsed.ca()}-{parsed.fmspc().upper()}"
    except (ValueError, TypeError, RuntimeError) as exc:
        raise EvidenceError(f"cannot find the quote's FMSPC and PCK CA: {exc}") from None
    if not _KEY_RE.fullmatch(key):
        raise EvidenceError(f"unexpected collateral key {key!r}")
    return key


async def fetch_collateral(pccs_url: str, quote: bytes) -> str:
    """Fetch collateral for ``quote`` from a PCCS (network I/O) and return its JSON text.

    :raises EvidenceError: the PCCS cannot be reached or answers with something unusable
        (dcap-qvl reports both as ``ValueError``/``RuntimeError``).
    """
    try:
        fetched = await dcap_qvl.get_collateral(pccs_url, bytes(quote))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise EvidenceError(
            f"cannot fetch collateral from {pccs_url}: {exc}", code="collateral_unavailable"
        ) from None
    return str(fetched.to_json())


@attrs.frozen(kw_only=True)
class CollateralCache:
    """Fetched collateral on disk, one file per ``collateral_key`` (``<key>.json``).

    An entry is used while the verification time lies inside the collateral's own window
    and the entry is younger than ``max_age`` seconds (wall clock); otherwise it is
    treated as absent. Writes are atomic, so several verifier processes may share one
    directory.

    :ivar directory: created on first write.
    :ivar max_age: seconds after fetching at which an entry goes stale.
    """

    directory: Path
    max_age: int = DEFAULT_MAX_AGE

    def _path(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise EvidenceError(f"invalid collateral cache key {key!r}")
        return self.directory / f"{key}.json"

    def get(self, key: str, *, now: int, wall_clock: int | None = None) -> Collateral | None:
        """The cached collateral for ``key`` if usable at ``now``, else None.

        A corrupt entry counts as absent (it will be overwritten by the next fetch).
        """
        wall = int(time.time()) if wall_clock is None else wall_clock
        try:
            doc = json.loads(self._path(key).read_text())
            if doc.get("format") != _CACHE_FORMAT or doc.get("version") != _CACHE_VERSION:
                return None
            fetched_at = int(doc["fetched_at"])
            collateral = Collateral.from_json(doc["collateral"])
        except (OSError, ValueError, KeyError, TypeError, EvidenceError):
            return None
        if wall - fetched_at >= self.max_age or not collateral.valid_at(now):
            return None
        return collateral

    def put(self, key: str, collateral: Collateral, *, wall_clock: int | None = None) -> None:
        """Store ``collateral`` under ``key``, replacing any older entry atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": _CACHE_FORMAT,
            "version": _CACHE_VERSION,
            "fetched_at": int(time.time()) if wall_clock is None else wall_clock,
            "sha256": hashlib.sha256(collateral.json.encode()).hexdigest(),
            "collateral": collateral.json,
        }
        atomic_write(self._path(key), json.dumps(doc).encode(), mode=0o644)


@attrs.frozen(kw_only=True)
class CollateralSource:
    """Where collateral comes from, in order: a fixed file, the cache, the PCCS.

    :ivar fixed: collateral used for every quote (``--collateral FILE``), or None.
    :ivar cache: a :class:`CollateralCache`, or None.
    :ivar pccs_url: a PCCS base URL to fetch from on a cache miss, or None (never fetch).
    :ivar fetcher: the network call; :func:`fetch_collateral` unless a test injects one.
    """

    fixed: Collateral | None = None
    cache: CollateralCache | None = None
    pccs_url: str | None = None
    fetcher: Fetcher = fetch_collateral

    @property
    def configured(self) -> bool:
        """Whether any source is configured at all."""
        return self.fixed is not None or self.cache is not None or self.pccs_url is not None

    async def collateral_for(self, quote: bytes, *, now: int) -> Collateral | None:
        """Collateral for ``quote`` at verification time ``now``, or None if none is known.

        :raises EvidenceError: the quote has no readable FMSPC (only when cache or PCCS is
            consulted), or the PCCS fetch fails or returns invalid collateral.
        """
        if self.fixed is not None:
            return self.fixed
        if self.cache is None and self.pccs_url is None:
            return None
        key = collateral_key(quote)
        if self.cache is not None:
            cached = self.cache.get(key, now=now)
            if cached is not None:
                return cached
        if self.pccs_url is None:
            return None
        collateral = Collateral.from_json(await self.fetcher(self.pccs_url, bytes(quote)))
        if self.cache is not None:
            self.cache.put(key, collateral)
        return collateral
