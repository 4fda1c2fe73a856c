"""Fakes of the Linux Intel TDX and AMD SEV-SNP guest kernel interfaces, for tests only.

**Nothing here is secure or meant for production.** It lets a TDX platform plugin run end to
end on a machine without TDX, against a kernel model derived from the kernel sources (see
the project note ``linux-tee-interfaces.md``, sections 1-3 and 6):

* :class:`FakeTdxMachine` lays out a real directory tree that looks like a TDX guest's ``/``:
  the configfs-tsm report directory, the sysfs measurement registers (Linux 6.16+), the ACPI
  CCEL table and log area (built with :class:`~dstack_core.ccel.Tcg2LogBuilder`),
  ``/dev/tdx_guest``, and dstack's host-shared inputs (app keys, app-compose, sys-config)
  with dstack's boot events already extended into RTMR3 and written to the runtime log, as
  dstack-util does at boot.
* :class:`FakeKernelIO` is a :class:`~dstack_core.sysio.SysIO` that performs the real
  filesystem syscalls on that tree and adds the kernel's side effects at the same syscall:
  ``mkdir`` of a report entry creates its attribute files; an ``inblob`` write is committed
  at close, its errors dropped, and moves the generation counter; reading ``outblob``
  generates a quote with the real v4 (or v5) layout, the current registers and the inblob
  as report data; writing a register file does the SHA-384 extend; file modes are enforced
  (tests run as root, the kernel would refuse).
* Switches inject the kernel's failures (:meth:`FakeTdxMachine.inject` and friends).

The hardware state (MRTD, RTMR0-3, the mock PKI seed, the injected faults, the report
entries' generation counters) lives in ``<root>/.fake-tdx/state.json`` under an ``flock``,
so an agent *subprocess* started with ``--platform-option root=<root> --platform-option
sysio=fake`` (and ``DSTACK_ALLOW_FAKE_KERNEL=1`` in its environment) sees the same registers
across restarts, and a test can flip a switch that the agent observes on its next syscall.

Quotes are signed by a :class:`~dstack_core.mockpki.MockIntelPki` seeded per machine; their
header user data says ``DSTACK-FAKE-TDX``. A verifier accepts them only when given
:meth:`FakeTdxMachine.trust_bundle`, never with Intel's root.

The SEV-SNP side (spec sections 1, 4 and 6.3) follows the same pattern:

* :class:`FakeSnpMachine` lays out an SNP guest's ``/``: configfs-tsm with the ``sev_guest``
  provider (``privlevel``, ``privlevel_floor``, ``auxblob``; the SVSM attributes under a
  VMPL above 0), ``/dev/sev-guest``, and the host-shared app-compose and sys-config. Its
  state lives in ``<root>/.fake-snp/state.json``.
* :class:`FakeSnpKernelIO` adds the kernel's side effects: configfs reports are the bare
  1184-byte SNP report; the ``SNP_GET_REPORT``, ``SNP_GET_DERIVED_KEY`` and
  ``SNP_GET_EXT_REPORT`` ioctls decode the real 32-byte ``snp_guest_request_ioctl`` and
  dereference its pointers with ctypes, answer MSG_REPORT_RSP / MSG_KEY_RSP, refuse
  ``msg_version`` 0 with EINVAL, copy ``exitinfo2`` back on failure (subject to CPython's
  small-buffer rule), and disable the VMPCK after a transport failure, as the kernel does.
* Reports are signed by the VCEK of a :class:`~dstack_core.mockpki_amd.MockAmdPki` seeded
  per machine (mock ARK -> ASK -> VCEK with AMD's certificate layout, for the machine's
  product: Milan by default, Genoa or Turin) and carry ``family_id`` ``DSTACK-FAKE-SNP``. A
  verifier accepts them only when given :meth:`FakeSnpMachine.trust_bundle`, never with
  AMD's ARKs.

The kernel semantics both share (the configfs-tsm report subsystem, the state store and its
fault switchboard, the host-shared inputs, the agent launcher) are written once, in
``_guest``, parameterised by a per-TEE record; ``_tdx`` and ``_snp`` hold only what differs:
the provider's report, the guest device, TDX's registers and CCEL, SNP's firmware.
"""

from __future__ import annotations

from pathlib import Path

from ...platform_options import ALLOW_FAKE_KERNEL_ENV
from ._guest import FAKE_OS_IMAGE_HASH as FAKE_OS_IMAGE_HASH
from ._guest import INBLOB_MAX as INBLOB_MAX
from ._guest import LOCK_FILE as LOCK_FILE
from ._guest import STATE_FILE as STATE_FILE
from ._guest import STATE_VERSION as STATE_VERSION
from ._guest import U64_MASK as U64_MASK
from ._snp import (
    DEFAULT_SNP_MEASUREMENT,
    FAKE_SNP_FAMILY_ID,
    SEV_GUEST_PROVIDER,
    SEV_RET_INVALID_KEY,
    SEV_RET_INVALID_PARAM,
    SNP_FAULT_OPS,
    SNP_GET_DERIVED_KEY,
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    SNP_GUEST_VMM_ERR_BUSY,
    SNP_GUEST_VMM_ERR_INVALID_LEN,
    SNP_KERNEL_PROFILES,
    FakeSnpAgent,
    FakeSnpKernelIO,
    FakeSnpMachine,
    FakeSnpPaths,
    SnpKernelProfile,
)
from ._snp import SEV_FW_BLOB_MAX_SIZE as SEV_FW_BLOB_MAX_SIZE
from ._snp import SEV_RET_SUCCESS as SEV_RET_SUCCESS
from ._snp import SNP_FIRMWARE_REQUESTS as SNP_FIRMWARE_REQUESTS
from ._snp import SNP_GUEST_REQUEST_SIZE as SNP_GUEST_REQUEST_SIZE
from ._snp import SNP_STATE_DIR as SNP_STATE_DIR
from ._tdx import CCEL_LAML as CCEL_LAML
from ._tdx import CCEL_LASA as CCEL_LASA
from ._tdx import (
    CRASH_POINTS,
    FAKE_TDX_USER_DATA,
    FAULT_OPS,
    KERNEL_PROFILES,
    TDX_CMD_EXTEND_RTMR_IOR,
    TDX_CMD_EXTEND_RTMR_IOW,
    TDX_CMD_GET_REPORT0,
    FakeKernelIO,
    FakeTdxAgent,
    FakeTdxMachine,
    FakeTdxPaths,
    KernelProfile,
    default_boot_log,
)
from ._tdx import DEFAULT_MRTD as DEFAULT_MRTD
from ._tdx import DEFAULT_XFAM as DEFAULT_XFAM
from ._tdx import EXTEND_REQ as EXTEND_REQ
from ._tdx import MR_CONFIG_ID_V1 as MR_CONFIG_ID_V1
from ._tdx import REGISTER_SIZE as REGISTER_SIZE
from ._tdx import REPORT_REQ_SIZE as REPORT_REQ_SIZE
from ._tdx import STATE_DIR as STATE_DIR
from ._tdx import TDREPORT_OFFSET as TDREPORT_OFFSET
from ._tdx import TDREPORT_REPORTDATA as TDREPORT_REPORTDATA
from ._tdx import TDREPORT_TDINFO_MRS as TDREPORT_TDINFO_MRS
from ._tdx import TDREPORT_TYPE_TDX as TDREPORT_TYPE_TDX
from ._tdx import TDX_ATTRIBUTES as TDX_ATTRIBUTES
from ._tdx import ZERO_REGISTER as ZERO_REGISTER

__all__ = [
    "ALLOW_FAKE_KERNEL_ENV",
    "CRASH_POINTS",
    "DEFAULT_SNP_MEASUREMENT",
    "FAKE_SNP_FAMILY_ID",
    "FAKE_TDX_USER_DATA",
    "FAULT_OPS",
    "KERNEL_PROFILES",
    "SEV_GUEST_PROVIDER",
    "SEV_RET_INVALID_KEY",
    "SEV_RET_INVALID_PARAM",
    "SNP_FAULT_OPS",
    "SNP_GET_DERIVED_KEY",
    "SNP_GET_EXT_REPORT",
    "SNP_GET_REPORT",
    "SNP_GUEST_VMM_ERR_BUSY",
    "SNP_GUEST_VMM_ERR_INVALID_LEN",
    "SNP_KERNEL_PROFILES",
    "TDX_CMD_EXTEND_RTMR_IOR",
    "TDX_CMD_EXTEND_RTMR_IOW",
    "TDX_CMD_GET_REPORT0",
    "FakeKernelIO",
    "FakeSnpAgent",
    "FakeSnpKernelIO",
    "FakeSnpMachine",
    "FakeSnpPaths",
    "FakeTdxAgent",
    "FakeTdxMachine",
    "FakeTdxPaths",
    "KernelProfile",
    "SnpKernelProfile",
    "default_boot_log",
    "open_machine",
]


def open_machine(root: Path | str) -> FakeTdxMachine | FakeSnpMachine:
    """The fake machine (TDX or SEV-SNP) whose tree is at ``root``.

    :raises FileNotFoundError: ``root`` holds no fake tree.
    """
    for machine in (FakeTdxMachine, FakeSnpMachine):
        try:
            return machine(Path(root))
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{root} holds no fake TDX or SEV-SNP tree")
