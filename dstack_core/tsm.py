"""Reports through configfs-tsm (``/sys/kernel/config/tsm/report``, Linux 6.7+), any provider.

configfs-tsm is one kernel interface for every TEE guest driver (``tdx_guest``,
``sev_guest``, ...), so the client lives here and a platform plugin supplies only its
:class:`TsmProvider`: the provider's name, what each errno means for it, and where its blob
carries the report data. The protocol (spec ``linux-tee-interfaces.md`` 1.4, "recommended
for our plugin"), for each request:

1. ``mkdir report/<private name>``: the kernel creates the provider's attribute files in it
   (ENXIO when no TEE driver registered a provider); a private entry needs no ``flock``;
2. ``provider`` must read the provider's name;
3. read the generation ``g0``;
4. write the request's text attributes (e.g. SNP's ``privlevel``), one ``write`` each:
   the kernel stores them, and reports their errors, at ``write`` time;
5. write exactly 64 bytes to ``inblob`` with one open/write/close. The kernel commits at
   close and *drops the commit's errors*, so the write's success proves nothing;
6. poll ``generation`` until it leaves the value ahead of the inblob commit (a commit can be
   deferred while another process holds the descriptor), and require ``g0`` plus the
   number of writes: anything else means another writer raced on the entry;
7. read ``outblob`` to EOF (no 8 KiB cap: DICE quotes are larger) and require it non-empty
   (a failed request can surface as an empty blob);
8. require ``generation`` unchanged, and the blob's report data to be ours;
9. ``rmdir`` the entry, whatever happened (configfs removes the attribute files itself).

A race retries with a fresh entry, :data:`RACE_ATTEMPTS` times in all. Requests are
serialised with a lock: the kernel serialises them too, but one at a time keeps errors
attributable. A client may bound how many requests wait behind the one in progress
(``queue_size``): one more is refused at once with :class:`PlatformBusy` instead of piling
up worker threads behind a slow quote service.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Final

import attrs

from .errors import InvalidRequest, PlatformBusy, PlatformError
from .kernel_errors import PERMISSION_DENIED, ErrnoTable, errno_name, kernel_error
from .sysio import SysIO
from .types import REPORT_DATA_LENGTH

__all__ = [
    "DEFAULT_COMMIT_TIMEOUT",
    "ENTRY_PREFIX",
    "MAX_COMMIT_TIMEOUT",
    "POLL_INTERVAL",
    "RACE_ATTEMPTS",
    "REPORT_DIR",
    "TSM_ERRNOS",
    "ProviderProbe",
    "TsmProvider",
    "TsmReportClient",
    "entry_failure",
]

REPORT_DIR: Final = PurePosixPath("sys/kernel/config/tsm/report")
"""configfs-tsm report entries, relative to the root (configfs mounted at /sys/kernel/config)."""
DEFAULT_COMMIT_TIMEOUT: Final = 5.0
"""Seconds to wait for the generation to move after the inblob write (dstack's value)."""
MAX_COMMIT_TIMEOUT: Final = 300.0
"""The largest commit timeout a plugin option may ask for, in seconds."""
POLL_INTERVAL: Final = 0.01
"""Seconds between two reads of ``generation`` while waiting for a commit."""
RACE_ATTEMPTS: Final = 3
"""Entries tried per request before a racing writer makes it :class:`PlatformBusy`."""
ENTRY_PREFIX: Final = "dstack-agent"
"""Report entries are named ``<prefix>-<pid>-<8 random hex digits>``."""

TSM_ERRNOS: Final[ErrnoTable] = MappingProxyType({
    errno.EACCES: (PlatformError, PERMISSION_DENIED),
    errno.EPERM: (PlatformError, PERMISSION_DENIED),
    errno.ENOENT: (
        PlatformError,
        "the configfs-tsm interface is missing (is configfs mounted at /sys/kernel/config?)",
    ),
    errno.EEXIST: (PlatformBusy, "a report entry of that name already exists; retry"),
})
"""What an errno means on a report entry whatever the provider; a :class:`TsmProvider`'s
own ``errnos`` come first."""

_NO_ATTRIBUTES: Final[Mapping[str, bytes]] = MappingProxyType({})

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class TsmProvider:
    """What the client needs to know about one configfs-tsm provider (from its plugin).

    :ivar name: what ``provider`` holds, newline stripped: the driver's ``KBUILD_MODNAME``,
        e.g. ``b"tdx_guest"``, ``b"sev_guest"``.
    :ivar label: the TEE as messages name it, e.g. ``"TDX"``, ``"SNP"``.
    :ivar blob: what ``outblob`` holds, as messages name it, e.g. ``"quote"``, ``"report"``.
    :ivar guest: the guest as messages name it, e.g. ``"a TDX guest"``.
    :ivar errnos: what each errno means on this provider's entries (:data:`TSM_ERRNOS`
        covers the ones every provider shares).
    :ivar report_data_of: given the outblob and its path, the report data the blob carries,
        or None for a format that has no known place for it; raises
        :class:`~dstack_core.errors.PlatformError` for a blob that cannot be this
        provider's (the path is for its message).
    :ivar empty_hint: why this provider can return an empty outblob, for that error's message.
    :ivar shows_privlevel: whether the provider shows ``privlevel`` and ``privlevel_floor``
        (``sev_guest`` does, ``tdx_guest`` hides them).
    """

    name: bytes = attrs.field(validator=attrs.validators.min_len(1))
    label: str
    blob: str
    guest: str
    errnos: ErrnoTable
    report_data_of: Callable[[bytes, Path], bytes | None]
    empty_hint: str | None = None
    shows_privlevel: bool = False

    @property
    def failure(self) -> str:
        """How a failed request's message starts, e.g. ``"TDX quote failed"``."""
        return f"{self.label} {self.blob} failed"

    def mismatch(self, found: bytes) -> str:
        """Why an entry whose ``provider`` reads ``found`` is of no use to this provider."""
        return (
            f"the configfs-tsm provider is {found.decode(errors='replace')!r}, "
            f"not {self.name.decode()!r}: this is not {self.guest}"
        )


@attrs.frozen(kw_only=True)
class ProviderProbe:
    """What a start-up probe found in a fresh entry.

    :ivar provider: what ``provider`` holds, newline stripped.
    :ivar privlevel_floor: the lowest ``privlevel`` the kernel accepts (on SNP, the VMPL the
        guest runs at), when the provider shows it; else None.
    """

    provider: bytes
    privlevel_floor: int | None


class _GenerationRace(Exception):
    """Another writer used our report entry between our write and our read."""


def entry_failure(report_dir: Path, exc: OSError) -> str:
    """Why a start-up probe could not create an entry, for a configuration error."""
    return (
        f"cannot create a configfs-tsm report entry in {report_dir}: {exc.strerror} "
        f"({errno_name(exc.errno)})"
    )


class TsmReportClient:
    """Reports from one configfs-tsm report directory, one private entry per request.
    Thread-safe: requests are serialised.

    :param io: the syscall seam.
    :param report_dir: ``<root>/sys/kernel/config/tsm/report``.
    :param provider: the provider every report must come from.
    :param commit_timeout: seconds to wait for an inblob commit to show in ``generation``.
    :param queue_size: how many requests may wait behind the one in progress; None means
        no bound. A request beyond it raises :class:`PlatformBusy` without waiting.
    """

    def __init__(
        self,
        io: SysIO,
        report_dir: Path,
        provider: TsmProvider,
        *,
        commit_timeout: float = DEFAULT_COMMIT_TIMEOUT,
        queue_size: int | None = None,
    ) -> None:
        self.io = io
        self.report_dir = report_dir
        self.provider = provider
        self.commit_timeout = commit_timeout
        self.queue_size = queue_size
        self._errnos: ErrnoTable = {**TSM_ERRNOS, **provider.errnos}
        self._lock = threading.Lock()
        self._admission = threading.Lock()
        self._admitted = 0  # requests in progress or waiting for _lock

    def _entry_name(self) -> Path:
        return self.report_dir / f"{ENTRY_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"

    def probe(self) -> ProviderProbe:
        """Create and remove an entry to learn the provider (and ``privlevel_floor``, where
        the provider shows it): the start-up check. Any provider is reported, not refused.

        :raises OSError: from the kernel (ENXIO: no provider registered).
        :raises ValueError: ``privlevel_floor`` is not a number.
        """
        entry = self._entry_name()
        self.io.mkdir(entry)
        try:
            provider = self.io.read(entry / "provider").strip()
            floor = None
            if self.provider.shows_privlevel and self.io.exists(entry / "privlevel_floor"):
                floor = int(self.io.read(entry / "privlevel_floor"))
            return ProviderProbe(provider=provider, privlevel_floor=floor)
        finally:
            self._remove(entry)

    def report(
        self, report_data: bytes, *, attributes: Mapping[str, bytes] = _NO_ATTRIBUTES
    ) -> bytes:
        """The provider's outblob over exactly 64 bytes of report data.

        :param attributes: text attributes to write before ``inblob``, in order, as
            ``{name: value}`` (e.g. ``{"privlevel": b"2\\n"}``); each must be one the
            provider shows.
        :returns: the outblob, never empty, carrying ``report_data`` where the provider's
            format says where.
        :raises InvalidRequest: report data that is not 64 bytes.
        :raises PlatformBusy: the queue is full, the kernel or host is busy, or other
            writers kept racing.
        :raises PlatformError: the kernel failed the request (the message names errno and
            path), or the entry is not the provider's.
        """
        if len(report_data) != REPORT_DATA_LENGTH:
            raise InvalidRequest(
                f"{self.provider.label} report data must be exactly {REPORT_DATA_LENGTH} "
                f"bytes, got {len(report_data)}"
            )
        with self._admission:
            if self.queue_size is not None and self._admitted > self.queue_size:
                raise PlatformBusy(
                    f"{self.provider.failure}: the {self.provider.label} quote service is busy "
                    f"({self._admitted} requests in progress or queued, at most "
                    f"{self.queue_size} may wait); retry later"
                )
            self._admitted += 1
        try:
            return self._report_serialised(report_data, attributes)
        finally:
            with self._admission:
                self._admitted -= 1

    def _report_serialised(self, report_data: bytes, attributes: Mapping[str, bytes]) -> bytes:
        with self._lock:
            last: _GenerationRace | None = None
            for _ in range(RACE_ATTEMPTS):
                try:
                    return self._report_once(bytes(report_data), attributes)
                except _GenerationRace as exc:
                    log.warning("configfs-tsm report entry raced, retrying: %s", exc)
                    last = exc
            raise PlatformBusy(
                f"{self.provider.failure}: another writer raced on the configfs-tsm report "
                f"entry {RACE_ATTEMPTS} times in a row ({last}); retry later"
            )

    def _report_once(self, report_data: bytes, attributes: Mapping[str, bytes]) -> bytes:
        provider = self.provider
        entry = self._entry_name()
        try:
            self.io.mkdir(entry)
        except OSError as exc:
            raise self._error(exc, "creating", entry) from exc
        try:
            found = self._read(entry / "provider").strip()
            if found != provider.name:
                raise PlatformError(f"{provider.failure}: {provider.mismatch(found)}")
            g0 = self._generation(entry)
            for name, value in attributes.items():
                self._write(entry / name, value)
            self._write(entry / "inblob", report_data)
            writes = len(attributes) + 1
            g1 = self._wait_commit(entry, g0 + writes - 1)
            if g1 != g0 + writes:
                over = "one inblob write" if writes == 1 else f"{writes} write(s)"
                raise _GenerationRace(f"generation went from {g0} to {g1} over {over}")
            outblob = entry / "outblob"
            blob = self._read(outblob)
            if not blob:
                hint = f"{provider.empty_hint}; " if provider.empty_hint else ""
                raise PlatformError(
                    f"{provider.failure}: the kernel returned an empty {provider.blob} "
                    f"({hint}reading {outblob})"
                )
            g2 = self._generation(entry)
            if g2 != g1:
                raise _GenerationRace(f"generation moved from {g1} to {g2} while reading outblob")
            carried = provider.report_data_of(blob, outblob)
            if carried is not None and carried != report_data:
                raise _GenerationRace(f"the {provider.blob} carries report data other than ours")
            return blob
        finally:
            self._remove(entry)

    def _error(self, exc: OSError, action: str, path: Path) -> PlatformError:
        return kernel_error(self._errnos, self.provider.failure, exc, action, path)

    def _read(self, path: Path) -> bytes:
        try:
            return self.io.read(path)
        except OSError as exc:
            raise self._error(exc, "reading", path) from exc

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self.io.write(path, data)
        except OSError as exc:
            raise self._error(exc, "writing", path) from exc

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation")
        try:
            return int(text)
        except ValueError:
            raise PlatformError(
                f"{self.provider.failure}: {entry / 'generation'} holds {text[:32]!r}, "
                "not a number"
            ) from None

    def _wait_commit(self, entry: Path, before: int) -> int:
        """Poll ``generation`` until it leaves ``before`` (its value ahead of the inblob
        commit): a commit can be deferred while another process holds the descriptor."""
        deadline = time.monotonic() + self.commit_timeout
        while True:
            generation = self._generation(entry)
            if generation != before:
                return generation
            if time.monotonic() >= deadline:
                raise PlatformBusy(
                    f"{self.provider.failure}: the kernel did not commit the report data "
                    f"within {self.commit_timeout:g} s (generation stayed at {before}); "
                    f"configfs drops commit errors such as EBUSY, so retry later "
                    f"({entry / 'inblob'})"
                )
            time.sleep(POLL_INTERVAL)

    def _remove(self, entry: Path) -> None:
        try:
            self.io.rmdir(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove configfs-tsm report entry %s: %s", entry, exc)
