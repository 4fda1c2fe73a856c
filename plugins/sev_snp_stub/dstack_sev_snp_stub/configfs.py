"""The ``sev_guest`` provider of configfs-tsm: what :mod:`dstack_core.tsm` needs for SNP reports.

The client in :mod:`dstack_core.tsm` runs the protocol (a private entry per request, the
generation checks, ``outblob`` read to EOF, the entry always removed); this module says what
is SNP about it:

* the provider's name and what each errno means (:data:`.kerrors.CONFIGFS_ERRNOS`);
* ``outblob`` is the bare 1184-byte report, and the report data sits at its fixed offset:
  any other size is a failure, and a report over someone else's report data is a race;
* when the guest runs above VMPL 0 (``privlevel_floor`` > 0, under an SVSM), ``privlevel``
  is written before the inblob (:func:`privlevel_attributes`): a report at a VMPL below
  the guest's own is refused.

``auxblob`` (the host's certificate table) is not read: the stub does not handle VCEK
certificates.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from dstack_core.errors import PlatformError
from dstack_core.snp import REPORT_DATA_OFFSET, REPORT_SIZE
from dstack_core.tsm import TsmProvider
from dstack_core.types import REPORT_DATA_LENGTH

from .kerrors import CONFIGFS_ERRNOS

__all__ = ["SEV_GUEST", "SEV_PROVIDER", "privlevel_attributes"]

SEV_PROVIDER: Final = b"sev_guest"
"""What ``provider`` holds (``KBUILD_MODNAME`` of the SEV guest driver), newline stripped."""


def _report_data_of(report: bytes, outblob: Path) -> bytes:
    if len(report) != REPORT_SIZE:
        raise PlatformError(
            f"SNP report failed: outblob is {len(report)} bytes, not the "
            f"{REPORT_SIZE}-byte SNP report ({outblob})"
        )
    return report[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + REPORT_DATA_LENGTH]


SEV_GUEST: Final = TsmProvider(
    name=SEV_PROVIDER,
    label="SNP",
    blob="report",
    guest="an SEV-SNP guest",
    errnos=CONFIGFS_ERRNOS,
    report_data_of=_report_data_of,
    shows_privlevel=True,
)
"""SNP reports through configfs-tsm (Linux 6.7+): give it to
:class:`dstack_core.tsm.TsmReportClient`."""


def privlevel_attributes(vmpl: int) -> Mapping[str, bytes]:
    """The attributes a report at ``vmpl`` writes before the inblob: ``privlevel``, written
    only above VMPL 0."""
    return {"privlevel": b"%d\n" % vmpl} if vmpl > 0 else {}
