"""TDX quotes through configfs-tsm (``/sys/kernel/config/tsm/report``, Linux 6.7+).

The protocol (spec 1.4, "recommended for our plugin"), for each request:

1. ``mkdir report/<private name>``: the kernel creates ``provider``, ``generation``,
   ``inblob`` and ``outblob`` in it (ENXIO when no TEE driver registered a provider);
2. ``provider`` must read ``tdx_guest``;
3. read the generation ``g0``;
4. write exactly 64 bytes to ``inblob`` with one open/write/close. The kernel commits at
   close and *drops the commit's errors*, so the write's success proves nothing;
5. poll ``generation`` until it moves (a commit can be deferred), and require ``g0 + 1``:
   anything else means another writer raced on the entry;
6. read ``outblob`` to EOF (no 8 KiB cap: DICE quotes are larger) and require it non-empty
   (a failed GetQuote can surface as an empty blob);
7. require ``generation`` unchanged, and the quote's report data to be ours;
8. ``rmdir`` the entry, whatever happened.

A race retries with a fresh entry; requests are serialised with a lock (the kernel
serialises them too, but one at a time keeps errors attributable).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Final

from dstack_core.errors import InvalidRequest, PlatformBusy, PlatformError
from dstack_core.quote import HEADER, QUOTE_VERSIONS, V4_REPORT_DATA_OFFSET, V5_REPORT_DATA_OFFSET
from dstack_core.sysio import SysIO
from dstack_core.types import REPORT_DATA_LENGTH

from .kerrors import quote_error

__all__ = [
    "DEFAULT_COMMIT_TIMEOUT",
    "ENTRY_PREFIX",
    "TDX_PROVIDER",
    "GenerationRace",
    "QuoteGenerator",
]

TDX_PROVIDER: Final = b"tdx_guest"
"""What ``provider`` holds (``KBUILD_MODNAME`` of the TDX guest driver), newline stripped."""
DEFAULT_COMMIT_TIMEOUT: Final = 5.0
"""Seconds to wait for the generation to move after the inblob write (dstack's value)."""
POLL_INTERVAL: Final = 0.01
RACE_ATTEMPTS: Final = 3
ENTRY_PREFIX: Final = "dstack-agent"

log = logging.getLogger(__name__)


class GenerationRace(Exception):
    """Another writer used our report entry between our write and our read."""


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


class QuoteGenerator:
    """Produces TDX quotes through one configfs-tsm report directory.

    :param io: the syscall seam.
    :param report_dir: ``<root>/sys/kernel/config/tsm/report``.
    :param commit_timeout: seconds to wait for an inblob commit to show in ``generation``.
    """

    def __init__(
        self, io: SysIO, report_dir: Path, *, commit_timeout: float = DEFAULT_COMMIT_TIMEOUT
    ) -> None:
        self.io = io
        self.report_dir = report_dir
        self.commit_timeout = commit_timeout
        self._lock = threading.Lock()

    def _entry_name(self) -> Path:
        return self.report_dir / f"{ENTRY_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"

    def probe_provider(self) -> bytes:
        """Create and remove an entry to learn the provider's name (start-up check).

        :returns: the provider name without its newline.
        :raises OSError: from the kernel (ENXIO: no provider registered).
        """
        entry = self._entry_name()
        self.io.mkdir(entry)
        try:
            return self.io.read(entry / "provider").strip()
        finally:
            self._remove(entry)

    def quote(self, report_data: bytes) -> bytes:
        """A quote over exactly 64 bytes of report data.

        :raises InvalidRequest: report data that is not 64 bytes.
        :raises PlatformBusy: the kernel or host is busy, or other writers kept racing.
        :raises PlatformError: the kernel failed the request (the message names errno and path).
        """
        if len(report_data) != REPORT_DATA_LENGTH:
            raise InvalidRequest(
                f"TDX report data must be exactly {REPORT_DATA_LENGTH} bytes, "
                f"got {len(report_data)}"
            )
        with self._lock:
            last: GenerationRace | None = None
            for _ in range(RACE_ATTEMPTS):
                try:
                    return self._quote_once(bytes(report_data))
                except GenerationRace as exc:
                    log.warning("configfs-tsm report entry raced, retrying: %s", exc)
                    last = exc
            raise PlatformBusy(
                f"TDX quote failed: another writer raced on the configfs-tsm report entry "
                f"{RACE_ATTEMPTS} times in a row ({last}); retry later"
            )

    def _quote_once(self, report_data: bytes) -> bytes:
        entry = self._entry_name()
        try:
            self.io.mkdir(entry)
        except OSError as exc:
            raise quote_error(exc, "creating", entry) from exc
        try:
            provider = self._read(entry / "provider").strip()
            if provider != TDX_PROVIDER:
                raise PlatformError(
                    f"TDX quote failed: the configfs-tsm provider is {provider.decode(errors='replace')!r}, "
                    f"not {TDX_PROVIDER.decode()!r}: this is not a TDX guest"
                )
            g0 = self._generation(entry)
            inblob = entry / "inblob"
            try:
                self.io.write(inblob, report_data)
            except OSError as exc:
                raise quote_error(exc, "writing", inblob) from exc
            g1 = self._wait_commit(entry, g0)
            if g1 != g0 + 1:
                raise GenerationRace(f"generation went from {g0} to {g1} over one inblob write")
            quote = self._read(entry / "outblob")
            if not quote:
                raise PlatformError(
                    "TDX quote failed: the kernel returned an empty quote (the host's GetQuote "
                    f"failed without an error code; reading {entry / 'outblob'})"
                )
            g2 = self._generation(entry)
            if g2 != g1:
                raise GenerationRace(f"generation moved from {g1} to {g2} while reading outblob")
            quoted = quoted_report_data(quote)
            if quoted is not None and quoted != report_data:
                raise GenerationRace("the quote carries report data other than ours")
            return quote
        finally:
            self._remove(entry)

    def _read(self, path: Path) -> bytes:
        try:
            return self.io.read(path)
        except OSError as exc:
            raise quote_error(exc, "reading", path) from exc

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation")
        try:
            return int(text)
        except ValueError:
            raise PlatformError(
                f"TDX quote failed: {entry / 'generation'} holds {text[:32]!r}, not a number"
            ) from None

    def _wait_commit(self, entry: Path, g0: int) -> int:
        """Poll ``generation`` until it leaves ``g0``: a commit can be deferred (``fput``)."""
        deadline = time.monotonic() + self.commit_timeout
        while True:
            generation = self._generation(entry)
            if generation != g0:
                return generation
            if time.monotonic() >= deadline:
                raise PlatformBusy(
                    f"TDX quote failed: the kernel did not commit the report data within "
                    f"{self.commit_timeout:g} s (generation stayed at {g0}); configfs drops "
                    f"commit errors such as EBUSY, so retry later ({entry / 'inblob'})"
                )
            time.sleep(POLL_INTERVAL)

    def _remove(self, entry: Path) -> None:
        try:
            self.io.rmdir(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove configfs-tsm report entry %s: %s", entry, exc)
