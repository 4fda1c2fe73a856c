"""The ``tdx_guest`` provider of configfs-tsm: what :mod:`dstack_core.tsm` needs for TDX quotes.

The client in :mod:`dstack_core.tsm` runs the protocol (a private entry per request, the
generation checks, ``outblob`` read to EOF, the entry always removed); this module says what
is TDX about it: the provider's name, what each errno means (:data:`.kerrors.QUOTE_ERRNOS`),
and where a v4/v5 quote carries the report data, so that a quote over someone else's
report data counts as a race. ``tdx_guest`` shows only ``provider``, ``generation``,
``inblob`` and ``outblob``: no attributes are written besides ``inblob``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from dstack_core.quote import HEADER, QUOTE_VERSIONS, V4_REPORT_DATA_OFFSET, V5_REPORT_DATA_OFFSET
from dstack_core.tsm import TsmProvider
from dstack_core.types import REPORT_DATA_LENGTH

from .kerrors import QUOTE_ERRNOS

__all__ = ["TDX_GUEST", "TDX_PROVIDER", "quoted_report_data"]

TDX_PROVIDER: Final = b"tdx_guest"
"""What ``provider`` holds (``KBUILD_MODNAME`` of the TDX guest driver), newline stripped."""


def quoted_report_data(quote: bytes) -> bytes | None:
    """The report data of a v4/v5 TDX quote, or None for another format (e.g. DICE/CWT)."""
    if len(quote) < HEADER.size:
        return None
    version = int.from_bytes(quote[:2], "little")
    if version not in QUOTE_VERSIONS:
        return None
    offset = V4_REPORT_DATA_OFFSET if version == 4 else V5_REPORT_DATA_OFFSET
    if len(quote) < offset + REPORT_DATA_LENGTH:
        return None
    return quote[offset : offset + REPORT_DATA_LENGTH]


def _report_data_of(quote: bytes, _outblob: Path) -> bytes | None:
    return quoted_report_data(quote)


TDX_GUEST: Final = TsmProvider(
    name=TDX_PROVIDER,
    label="TDX",
    blob="quote",
    guest="a TDX guest",
    errnos=QUOTE_ERRNOS,
    report_data_of=_report_data_of,
    empty_hint="the host's GetQuote failed without an error code",
)
"""TDX quotes through configfs-tsm (Linux 6.7+): give it to
:class:`dstack_core.tsm.TsmReportClient`."""

