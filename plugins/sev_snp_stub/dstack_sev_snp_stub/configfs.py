"""SNP reports through configfs-tsm (``/sys/kernel/config/tsm/report``, Linux 6.7+).

The protocol (spec 1.4, "recommended for our plugin", with the SNP steps), per request:

1. ``mkdir report/<private name>``: the kernel creates the ``sev_guest`` attributes;
2. ``provider`` must read ``sev_guest``;
3. read the generation ``g0``;
4. when the guest runs above VMPL 0 (``privlevel_floor`` > 0, under an SVSM), write
   ``privlevel``: a report at a VMPL below the guest's own is refused;
5. write exactly 64 bytes to ``inblob`` with one open/write/close (committed at close, the
   commit's errors dropped by the kernel);
6. poll ``generation`` until it moves, and require ``g0`` plus the number of writes;
7. read ``outblob`` to EOF: the bare 1184-byte report; an empty blob is a failure;
8. require ``generation`` unchanged, and the report's report data to be ours;
9. ``rmdir`` the entry, whatever happened.

``auxblob`` (the host's certificate table) is not read: the stub does not handle VCEK
certificates. A race retries with a fresh entry.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import Final

import attrs

from dstack_core.errors import InvalidRequest, PlatformBusy, PlatformError
from dstack_core.snp import REPORT_DATA_OFFSET, REPORT_SIZE
from dstack_core.sysio import SysIO
from dstack_core.types import REPORT_DATA_LENGTH

from .kerrors import configfs_error

__all__ = [
    "DEFAULT_COMMIT_TIMEOUT",
    "ENTRY_PREFIX",
    "SEV_PROVIDER",
    "ConfigfsReports",
    "GenerationRace",
    "ProviderProbe",
]

SEV_PROVIDER: Final = b"sev_guest"
"""What ``provider`` holds (``KBUILD_MODNAME`` of the SEV guest driver), newline stripped."""
DEFAULT_COMMIT_TIMEOUT: Final = 5.0
POLL_INTERVAL: Final = 0.01
RACE_ATTEMPTS: Final = 3
ENTRY_PREFIX: Final = "dstack-agent"

log = logging.getLogger(__name__)


class GenerationRace(Exception):
    """Another writer used our report entry between our write and our read."""


@attrs.frozen
class ProviderProbe:
    """What a start-up probe found: the provider's name, and ``privlevel_floor`` (the VMPL
    the guest runs at) when the kernel shows it."""

    provider: bytes
    privlevel_floor: int | None


class ConfigfsReports:
    """Produces SNP reports through one configfs-tsm report directory. Not thread-safe:
    callers serialise.

    :param io: the syscall seam.
    :param report_dir: ``<root>/sys/kernel/config/tsm/report``.
    :param privlevel: the VMPL to request; written only when above 0.
    :param commit_timeout: seconds to wait for an inblob commit to show in ``generation``.
    """

    def __init__(
        self,
        io: SysIO,
        report_dir: Path,
        *,
        privlevel: int = 0,
        commit_timeout: float = DEFAULT_COMMIT_TIMEOUT,
    ) -> None:
        self.io = io
        self.report_dir = report_dir
        self.privlevel = privlevel
        self.commit_timeout = commit_timeout

    def _entry_name(self) -> Path:
        return self.report_dir / f"{ENTRY_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"

    def probe(self) -> ProviderProbe:
        """Create and remove an entry to learn the provider and ``privlevel_floor``.

        :raises OSError: from the kernel (ENXIO: no provider registered).
        """
        entry = self._entry_name()
        self.io.mkdir(entry)
        try:
            provider = self.io.read(entry / "provider").strip()
            floor = None
            if self.io.exists(entry / "privlevel_floor"):
                floor = int(self.io.read(entry / "privlevel_floor"))
            return ProviderProbe(provider, floor)
        finally:
            self._remove(entry)

    def report(self, report_data: bytes) -> bytes:
        """A report over exactly 64 bytes of report data.

        :raises InvalidRequest: report data that is not 64 bytes.
        :raises PlatformBusy: the kernel or host is busy, or other writers kept racing.
        :raises PlatformError: the kernel failed the request (the message names errno and path).
        """
        if len(report_data) != REPORT_DATA_LENGTH:
            raise InvalidRequest(
                f"SNP report data must be exactly {REPORT_DATA_LENGTH} bytes, "
                f"got {len(report_data)}"
            )
        last: GenerationRace | None = None
        for _ in range(RACE_ATTEMPTS):
            try:
                return self._report_once(bytes(report_data))
            except GenerationRace as exc:
                log.warning("configfs-tsm report entry raced, retrying: %s", exc)
                last = exc
        raise PlatformBusy(
            f"SNP report failed: another writer raced on the configfs-tsm report entry "
            f"{RACE_ATTEMPTS} times in a row ({last}); retry later"
        )

    def _report_once(self, report_data: bytes) -> bytes:
        entry = self._entry_name()
        try:
            self.io.mkdir(entry)
        except OSError as exc:
            raise configfs_error(exc, "creating", entry) from exc
        try:
            provider = self._read(entry / "provider").strip()
            if provider != SEV_PROVIDER:
                raise PlatformError(
                    f"SNP report failed: the configfs-tsm provider is "
                    f"{provider.decode(errors='replace')!r}, not {SEV_PROVIDER.decode()!r}: "
                    "this is not an SEV-SNP guest"
                )
            g0 = self._generation(entry)
            writes = 0
            if self.privlevel > 0:
                self._write(entry / "privlevel", b"%d\n" % self.privlevel)
                writes += 1
            self._write(entry / "inblob", report_data)
            writes += 1
            g1 = self._wait_commit(entry, g0 + writes - 1)
            if g1 != g0 + writes:
                raise GenerationRace(
                    f"generation went from {g0} to {g1} over {writes} write(s)"
                )
            report = self._read(entry / "outblob")
            if not report:
                raise PlatformError(
                    "SNP report failed: the kernel returned an empty report "
                    f"(reading {entry / 'outblob'})"
                )
            g2 = self._generation(entry)
            if g2 != g1:
                raise GenerationRace(f"generation moved from {g1} to {g2} while reading outblob")
            if len(report) != REPORT_SIZE:
                raise PlatformError(
                    f"SNP report failed: outblob is {len(report)} bytes, not the "
                    f"{REPORT_SIZE}-byte SNP report ({entry / 'outblob'})"
                )
            quoted = report[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + REPORT_DATA_LENGTH]
            if quoted != report_data:
                raise GenerationRace("the report carries report data other than ours")
            return report
        finally:
            self._remove(entry)

    def _read(self, path: Path) -> bytes:
        try:
            return self.io.read(path)
        except OSError as exc:
            raise configfs_error(exc, "reading", path) from exc

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self.io.write(path, data)
        except OSError as exc:
            raise configfs_error(exc, "writing", path) from exc

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation")
        try:
            return int(text)
        except ValueError:
            raise PlatformError(
                f"SNP report failed: {entry / 'generation'} holds {text[:32]!r}, not a number"
            ) from None

    def _wait_commit(self, entry: Path, before: int) -> int:
        """Poll ``generation`` until it leaves ``before`` (the value ahead of the inblob
        commit): a commit can be deferred while another process holds the descriptor."""
        deadline = time.monotonic() + self.commit_timeout
        while True:
            generation = self._generation(entry)
            if generation != before:
                return generation
            if time.monotonic() >= deadline:
                raise PlatformBusy(
                    f"SNP report failed: the kernel did not commit the report data within "
                    f"{self.commit_timeout:g} s (generation stayed at {before}); configfs "
                    f"drops commit errors such as EBUSY, so retry later ({entry / 'inblob'})"
                )
            time.sleep(POLL_INTERVAL)

    def _remove(self, entry: Path) -> None:
        try:
            self.io.rmdir(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove configfs-tsm report entry %s: %s", entry, exc)
