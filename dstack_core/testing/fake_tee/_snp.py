"""The fake AMD SEV-SNP guest: configfs-tsm with the ``sev_guest`` provider and
``/dev/sev-guest`` (spec sections 1, 4 and 6.3). Re-exported by
:mod:`dstack_core.testing.fake_tee`, which says more.

Its hardware lives in ``<root>/.fake-snp/state.json``. Layouts are written out here from the
spec, independently of :mod:`dstack_core.snp`, so the fake does not share code with the
parser under test.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ...mockpki_amd import MOCK_PRODUCTS, MockAmdPki, MockProduct
from ...types import TrustBundle
from ._guest import (
    _PRIVLEVEL_MAX,
    _consume,
    _default_app_compose,
    _GuestAgent,
    _GuestKernelIO,
    _GuestKind,
    _GuestMachine,
    _GuestPaths,
    _oserror,
    _take_counter,
)

SNP_STATE_DIR: Final = ".fake-snp"
SEV_GUEST_PROVIDER: Final = "sev_guest"
FAKE_SNP_FAMILY_ID: Final = b"DSTACK-FAKE-SNP\0"
"""The family_id (set by the guest owner at launch) of every fake SNP report."""

SNP_GUEST_REQUEST_SIZE: Final = 32
SNP_GET_REPORT: Final = (3 << 30) | (SNP_GUEST_REQUEST_SIZE << 16) | (ord("S") << 8) | 0
SNP_GET_DERIVED_KEY: Final = (3 << 30) | (SNP_GUEST_REQUEST_SIZE << 16) | (ord("S") << 8) | 1
SNP_GET_EXT_REPORT: Final = (3 << 30) | (SNP_GUEST_REQUEST_SIZE << 16) | (ord("S") << 8) | 2
assert (SNP_GET_REPORT, SNP_GET_DERIVED_KEY, SNP_GET_EXT_REPORT) == (
    0xC0205300, 0xC0205301, 0xC0205302)

_SNP_GUEST_REQUEST: Final = struct.Struct("<B7xQQQ")
"""``struct snp_guest_request_ioctl``: u8 msg_version, pad, u64 req_data, resp_data, exitinfo2."""
_SNP_EXITINFO2_OFFSET: Final = 24
_SNP_REPORT_REQ: Final = struct.Struct("<64sI28s")
"""``struct snp_report_req``: user_data[64], u32 vmpl, rsvd[28] (96 bytes)."""
_SNP_DERIVED_KEY_REQ: Final = struct.Struct("<IIQIIQ")
"""``struct snp_derived_key_req``: root_key_select, rsvd, guest_field_select, vmpl,
guest_svn, tcb_version (32 bytes)."""
_SNP_EXT_REPORT_REQ: Final = struct.Struct("<96sQI4x")
"""``struct snp_ext_report_req``: the report request, u64 certs_address, u32 certs_len (112)."""
_SNP_REPORT_RESP_SIZE: Final = 4000
"""``struct snp_report_resp``: the kernel copies all 4000 bytes to ``resp_data``."""
_SNP_DERIVED_KEY_RESP_SIZE: Final = 64
_MSG_RSP_HEADER: Final = struct.Struct("<II24x")
"""MSG_REPORT_RSP: u32 status, u32 report_size, 24 reserved bytes; the report at 32."""
_MSG_KEY_RSP: Final = struct.Struct("<I28x32s")
"""MSG_KEY_RSP: u32 status, 28 reserved bytes, the 32-byte key at 0x20."""
_FCNTL_STACK_BUFFER: Final = 1024
"""CPython's ``fcntl.ioctl`` copies buffers up to this size through a temporary."""

SEV_RET_SUCCESS: Final = 0
SEV_RET_INVALID_PARAM: Final = 0x16
SEV_RET_INVALID_KEY: Final = 0x27
SNP_GUEST_VMM_ERR_INVALID_LEN: Final = 1
SNP_GUEST_VMM_ERR_BUSY: Final = 2
SEV_FW_BLOB_MAX_SIZE: Final = 0x4000
_PAGE_SIZE: Final = 4096
_GUEST_FIELD_SELECT_BITS: Final = 0x3F
"""policy, image_id, family_id, measurement, guest_svn, tcb_version (bits 0-5)."""

_SNP_REPORT_SIZE: Final = 0x4A0
_SNP_SIGNED_SIZE: Final = 0x2A0
_SNP_REPORT_VERSION: Final = 3
_SNP_DEFAULT_POLICY: Final = (1 << 17) | (1 << 16)
"""The must-be-one bit and SMT allowed; DEBUG (bit 19) clear."""
_SNP_DEFAULT_PRODUCT: Final = "Milan"
_SNP_DEFAULT_TCBS: Final = {
    "Milan": 0xD315000000000304,
    "Genoa": 0x5417000000000309,
    "Turin": 0x4800000001030201,
}
"""A made-up TCB_VERSION per product, in its layout. Milan and Genoa: boot loader, TEE, four
reserved bytes, SNP, microcode (Milan: 4, 3, SNP 0x15, microcode 0xD3); Turin: FMC, boot
loader, TEE, SNP, three reserved bytes, microcode (1, 2, 3, 1, microcode 0x48)."""
DEFAULT_SNP_MEASUREMENT: Final = hashlib.sha384(b"dstack-core fake SEV-SNP launch (not hardware)").digest()

SNP_FAULT_OPS: Final = frozenset(
    {"mkdir", "rmdir", "provider", "generation", "inblob", "commit", "privlevel", "outblob",
     "ioctl"}
)
"""Where :meth:`FakeSnpMachine.inject` can make a syscall fail (as :data:`FAULT_OPS`;
``privlevel`` fails that text attribute's ``write(2)``; ``ioctl`` fails an ioctl before the
kernel reads its argument, so nothing is copied back)."""
SNP_FIRMWARE_REQUESTS: Final = frozenset({"report", "key", "any"})

_SNP_ATTRIBUTE_MODES: Final = {
    "generation": 0o444,
    "provider": 0o444,
    "privlevel": 0o200,
    "privlevel_floor": 0o444,
    "inblob": 0o200,
    "outblob": 0o444,
    "auxblob": 0o444,
}
_SVSM_ATTRIBUTE_MODES: Final = {
    "service_provider": 0o200,
    "service_guid": 0o200,
    "service_manifest_version": 0o200,
    "manifestblob": 0o444,
}


@attrs.frozen(kw_only=True)
class SnpKernelProfile:
    """What a kernel version offers an SEV-SNP guest (spec sections 1.7, 4 and 7).

    :ivar configfs: configfs-tsm with the ``sev_guest`` provider (6.7+).
    :ivar svsm: the ``service_*`` and ``manifestblob`` attributes when running under an
        SVSM (VMPL above 0; 6.10+).
    :ivar outblob_max: ``TSM_REPORT_OUTBLOB_MAX``.
    """

    configfs: bool
    svsm: bool = False
    outblob_max: int = 32 * 1024


SNP_KERNEL_PROFILES: Final[Mapping[str, SnpKernelProfile]] = {
    "5.19": SnpKernelProfile(configfs=False),
    "6.7": SnpKernelProfile(configfs=True),
    "6.10": SnpKernelProfile(configfs=True, svsm=True),
    "7.0": SnpKernelProfile(configfs=True, svsm=True, outblob_max=16 << 20),
}
"""SNP kernel profiles by name: ``5.19`` has only ``/dev/sev-guest``."""


@attrs.frozen
class FakeSnpPaths(_GuestPaths):
    """Where everything lives in a fake SNP tree (the same relative paths as in a guest)."""

    _state_dir = SNP_STATE_DIR
    _device = "dev/sev-guest"


_SNP: Final = _GuestKind(
    provider=SEV_GUEST_PROVIDER,
    label="SEV-SNP",
    machine="FakeSnpMachine",
    paths=FakeSnpPaths,
    profiles=SNP_KERNEL_PROFILES,
    profile_noun="SNP kernel profile",
    fault_ops=SNP_FAULT_OPS,
    platform="sev-snp-stub",
    blob_noun="blob",
)

def _pki(state: dict[str, Any]) -> MockAmdPki:
    """The machine's mock AMD hierarchy (ARK -> ASK -> VCEK): derived from its seed, never AMD's."""
    return MockAmdPki.from_seed(bytes.fromhex(state["seed"]), product=_product(state).name)


def _product(state: dict[str, Any]) -> MockProduct:
    return MOCK_PRODUCTS[state.get("product", _SNP_DEFAULT_PRODUCT)]


def _snp_report(state: dict[str, Any], report_data: bytes, vmpl: int) -> bytes:
    """A 1184-byte report laid out as spec 4.2, signed with the fake VCEK if enabled."""
    report = bytearray(_SNP_REPORT_SIZE)
    version = int(state["report_version"])
    tcb = int(state["tcb"])
    struct.pack_into("<IIQ", report, 0x000, version, int(state["guest_svn"]), int(state["policy"]))
    report[0x010:0x020] = bytes.fromhex(state["family_id"])
    report[0x020:0x030] = bytes.fromhex(state["image_id"])
    # vmpl, signature_algo (1 = ECDSA P-384/SHA-384), current_tcb, platform_info (SMT on),
    # signer_info (signing key 0 = VCEK).
    struct.pack_into("<IIQQI", report, 0x030, vmpl, 1, tcb, 1, 0)
    report[0x050:0x090] = report_data
    report[0x090:0x0C0] = bytes.fromhex(state["measurement"])
    report[0x0C0:0x0E0] = bytes.fromhex(state["host_data"])
    report[0x140:0x160] = bytes.fromhex(state["report_id"])
    report[0x160:0x180] = b"\xff" * 32  # report_id_ma: no migration agent
    struct.pack_into("<Q", report, 0x180, tcb)
    if version >= 3:
        report[0x188:0x18B] = bytes(_product(state).cpuid)  # family, model, stepping
    report[0x1A0:0x1E0] = bytes.fromhex(state["chip_id"])
    struct.pack_into("<Q", report, 0x1E0, tcb)
    report[0x1E8:0x1EB] = bytes((0x15, 0x37, 0x01))  # firmware 1.55 build 0x15
    report[0x1EC:0x1EF] = bytes((0x15, 0x37, 0x01))
    struct.pack_into("<Q", report, 0x1F0, tcb)
    if state["sign"]:
        vcek = _pki(state).vcek_key(bytes.fromhex(state["chip_id"]), tcb)
        der = vcek.sign(bytes(report[:_SNP_SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        report[0x2A0:0x2E8] = r.to_bytes(72, "little")
        report[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(report)


def _snp_derived_key(state: dict[str, Any], root_key_select: int, field_select: int,
                     vmpl: int, guest_svn: int, tcb_version: int) -> bytes:
    """The firmware's derived key: the selected root secret mixed with the selected fields."""
    root = "vmrk" if root_key_select & 1 else "seed"
    material = [
        b"fake-snp-derived-key", bytes.fromhex(state[root]),
        struct.pack("<IQ", vmpl, field_select),
    ]
    for bit, value in (
        (0, struct.pack("<Q", int(state["policy"]))),
        (1, bytes.fromhex(state["image_id"])),
        (2, bytes.fromhex(state["family_id"])),
        (3, bytes.fromhex(state["measurement"])),
        (4, struct.pack("<I", guest_svn)),
        (5, struct.pack("<Q", tcb_version)),
    ):
        if field_select >> bit & 1:
            material.append(value)
    return hashlib.sha256(b"".join(material)).digest()


class _GuestRequestFailed(Exception):
    """An ioctl failure: the errno, and the exitinfo2 the kernel copies back (0: none)."""

    def __init__(self, code: int, exitinfo2: int, detail: str) -> None:
        super().__init__(detail)
        self.code, self.exitinfo2, self.detail = code, exitinfo2, detail



class FakeSnpKernelIO(_GuestKernelIO):
    """A :class:`~dstack_core.sysio.SysIO` over a fake SEV-SNP tree: real syscalls plus the
    kernel's side effects (configfs-tsm with the ``sev_guest`` provider, ``/dev/sev-guest``).

    The ioctl handler decodes the real 32-byte ``snp_guest_request_ioctl`` from the buffer
    it is given and **dereferences** ``req_data``/``resp_data`` (and ``certs_address``) as
    the kernel does, with ctypes, so a plugin's marshalling is exercised for real: the
    kernel copies 4000 bytes to a report's ``resp_data`` and 64 to a key's, whatever the
    caller allocated. Buffers of up to 1024 bytes behave as CPython's ``fcntl.ioctl``
    treats them: copied through a temporary, copied back only on success (the newest
    CPython; :meth:`FakeSnpMachine.set_copyback` selects the older "always").

    :ivar calls: ``(operation, path relative to root, byte count)`` of every call.
    """

    _kind = _SNP
    _attribute_modes = _SNP_ATTRIBUTE_MODES
    _entry_fields: ClassVar[Mapping[str, Any]] = {
        "privlevel": 0, "service_provider": None, "blobs": None
    }

    paths: FakeSnpPaths
    profile: SnpKernelProfile

    def _attributes(self, state: dict[str, Any]) -> Mapping[str, int]:
        """The attributes ``sev_report_attr_visible`` shows for this guest."""
        modes = dict(_SNP_ATTRIBUTE_MODES)
        if self.profile.svsm and state["vmpl"] > 0:
            modes.update(_SVSM_ATTRIBUTE_MODES)
        return modes

    def _known_attributes(self) -> frozenset[str]:
        return frozenset(_SNP_ATTRIBUTE_MODES) | frozenset(_SVSM_ATTRIBUTE_MODES)

    def _privlevel_floor(self, state: dict[str, Any]) -> int:
        return int(state["vmpl"])

    # --- configfs-tsm: sev_report_new ---

    def _cached_blobs(self, entry: dict[str, Any]) -> Mapping[str, bytes] | None:
        blobs = entry["blobs"]
        return None if blobs is None else {k: bytes.fromhex(v) for k, v in blobs.items()}

    def _cache_blobs(self, entry: dict[str, Any], blobs: Mapping[str, bytes] | None) -> None:
        entry["blobs"] = None if blobs is None else {k: v.hex() for k, v in blobs.items()}

    def _report_new(
        self, state: dict[str, Any], entry: dict[str, Any], path: Path, inblob: bytes
    ) -> dict[str, bytes]:
        try:
            self._send(state)
        except _GuestRequestFailed as failure:
            raise _oserror(failure.code, path, failure.detail) from None
        status = _firmware_status(state, "report", entry["privlevel"])
        if status in (SEV_RET_INVALID_PARAM, SEV_RET_INVALID_KEY):
            raise _oserror(errno.EINVAL, path, f"firmware status {status:#x}")
        if status != SEV_RET_SUCCESS:
            raise _oserror(errno.ENXIO, path, f"firmware status {status:#x}")
        if _take_counter(state, "counters", "empty_outblob"):
            report = b""
        else:
            report = _snp_report(state, inblob, entry["privlevel"])
        certs = bytes.fromhex(state["certs"]) if state["certs"] else b""
        return {"outblob": report, "auxblob": certs, "manifestblob": b""}

    # --- /dev/sev-guest ---

    def _device_ioctl(
        self, state: dict[str, Any], device: Path, request: int, arg: bytearray
    ) -> bool:
        # What fcntl.ioctl hands the kernel: the buffer itself when larger than 1024
        # bytes, else a temporary copy that CPython copies back afterwards.
        direct = len(arg) > _FCNTL_STACK_BUFFER
        user = arg if direct else bytearray(arg)
        try:
            self._guest_ioctl(state, request, user)
        except _GuestRequestFailed as failure:
            if failure.exitinfo2 and len(user) >= SNP_GUEST_REQUEST_SIZE:
                struct.pack_into("<Q", user, _SNP_EXITINFO2_OFFSET, failure.exitinfo2)
            if not direct and state["copyback"] == "always":
                arg[:] = user
            raise _oserror(failure.code, device, failure.detail) from None
        if not direct:
            arg[:] = user
        return False

    def _guest_ioctl(self, state: dict[str, Any], request: int, user: bytearray) -> None:
        """``snp_guest_ioctl``: copy in 32 bytes, exitinfo2 = 0xff, dispatch, copy back the
        struct when exitinfo2 is non-zero (done by the caller)."""
        if len(user) < SNP_GUEST_REQUEST_SIZE:
            raise _GuestRequestFailed(errno.EFAULT, 0, "argument shorter than 32 bytes")
        msg_version, req_data, resp_data, _ = _SNP_GUEST_REQUEST.unpack_from(user, 0)
        if msg_version == 0:
            raise _GuestRequestFailed(errno.EINVAL, 0, "msg_version must be non-zero")
        if request not in (SNP_GET_REPORT, SNP_GET_DERIVED_KEY, SNP_GET_EXT_REPORT):
            raise _GuestRequestFailed(errno.ENOTTY, 0xFF, f"unknown ioctl {request:#x}")
        if not req_data or not resp_data:
            raise _GuestRequestFailed(errno.EINVAL, 0xFF, "req_data and resp_data are required")
        if request == SNP_GET_DERIVED_KEY:
            self._derived_key(state, req_data, resp_data)
        elif request == SNP_GET_REPORT:
            request_bytes = ctypes.string_at(req_data, _SNP_REPORT_REQ.size)
            self._report(state, request_bytes, resp_data)
        else:
            self._ext_report(state, req_data, resp_data)

    @staticmethod
    def _send(state: dict[str, Any]) -> None:
        """``snp_send_guest_request``: a disabled VMPCK, or an injected transport failure
        (which disables the VMPCK unless it is the non-fatal INVALID_LEN)."""
        if state["vmpck_disabled"]:
            raise _GuestRequestFailed(errno.ENOTTY, 0xFF, "VMPCK is disabled until reboot")
        failure = _take_guest_error(state)
        if failure is not None:
            if failure["disable_vmpck"]:
                state["vmpck_disabled"] = True
            exitinfo2 = (failure["vmm_error"] << 32) | failure["fw_error"]
            raise _GuestRequestFailed(failure["errno"], exitinfo2, "injected guest request failure")

    def _report(self, state: dict[str, Any], request_bytes: bytes, resp_data: int) -> None:
        user_data, vmpl, reserved = _SNP_REPORT_REQ.unpack(request_bytes)
        self._send(state)
        status = _firmware_status(state, "report", vmpl)
        if any(reserved):
            status = status or SEV_RET_INVALID_PARAM
        response = bytearray(_SNP_REPORT_RESP_SIZE)
        if status == SEV_RET_SUCCESS:
            _MSG_RSP_HEADER.pack_into(response, 0, SEV_RET_SUCCESS, _SNP_REPORT_SIZE)
            response[32 : 32 + _SNP_REPORT_SIZE] = _snp_report(state, user_data, vmpl)
        else:
            _MSG_RSP_HEADER.pack_into(response, 0, status, 0)
        ctypes.memmove(resp_data, bytes(response), len(response))

    def _derived_key(self, state: dict[str, Any], req_data: int, resp_data: int) -> None:
        fields = _SNP_DERIVED_KEY_REQ.unpack(ctypes.string_at(req_data, _SNP_DERIVED_KEY_REQ.size))
        root_key_select, reserved, field_select, vmpl, guest_svn, tcb_version = fields
        self._send(state)
        status = _firmware_status(state, "key", vmpl)
        if status == SEV_RET_SUCCESS and (
            root_key_select & ~1 or reserved or field_select & ~_GUEST_FIELD_SELECT_BITS
            or guest_svn > state["guest_svn"] or tcb_version > state["tcb"]
        ):
            status = SEV_RET_INVALID_PARAM
        if status == SEV_RET_SUCCESS and root_key_select & 1 and state["vmrk"] is None:
            status = SEV_RET_INVALID_KEY  # no VMRK installed (approximated; unverified)
        key = bytes(32)
        if status == SEV_RET_SUCCESS:
            key = _snp_derived_key(state, root_key_select, field_select, vmpl, guest_svn,
                                   tcb_version)
        ctypes.memmove(resp_data, _MSG_KEY_RSP.pack(status, key), _SNP_DERIVED_KEY_RESP_SIZE)

    def _ext_report(self, state: dict[str, Any], req_data: int, resp_data: int) -> None:
        """``get_ext_report``: a plain report without a certificate buffer; else the
        certificate-length dance (page-aligned, at most 16 KiB, EIO + INVALID_LEN)."""
        raw = ctypes.string_at(req_data, _SNP_EXT_REPORT_REQ.size)
        report_request, certs_address, certs_len = _SNP_EXT_REPORT_REQ.unpack(raw)
        if not certs_address or not certs_len:
            return self._report(state, report_request, resp_data)
        if certs_len > SEV_FW_BLOB_MAX_SIZE or certs_len % _PAGE_SIZE:
            raise _GuestRequestFailed(errno.EINVAL, 0xFF, "certs_len not page-aligned or too big")
        certs = bytes.fromhex(state["certs"]) if state["certs"] else b""
        needed = -(-len(certs) // _PAGE_SIZE) * _PAGE_SIZE
        if certs_len < needed:
            ctypes.memmove(
                req_data, _SNP_EXT_REPORT_REQ.pack(report_request, certs_address, needed),
                _SNP_EXT_REPORT_REQ.size,
            )
            raise _GuestRequestFailed(
                errno.EIO, SNP_GUEST_VMM_ERR_INVALID_LEN << 32, "certificate buffer too small"
            )
        self._report(state, report_request, resp_data)
        ctypes.memmove(certs_address, certs.ljust(certs_len, b"\0"), certs_len)


def _take_guest_error(state: dict[str, Any]) -> dict[str, Any] | None:
    return _consume(state["guest_errors"])


def _firmware_status(state: dict[str, Any], request: str, vmpl: int) -> int:
    """The payload status the firmware answers: injected, else INVALID_PARAM for a VMPL
    below the guest's own or above 3, else success."""
    injected = _consume(state["firmware_status"], lambda e: e["request"] in (request, "any"))
    if injected is not None:
        return int(injected["status"])
    if not state["vmpl"] <= vmpl <= _PRIVLEVEL_MAX:
        return SEV_RET_INVALID_PARAM
    return SEV_RET_SUCCESS


class FakeSnpAgent(_GuestAgent):
    """An :class:`~dstack_core.testing.AgentProcess` serving ``--platform sev-snp-stub`` on
    a fake SNP tree.

    :ivar machine: the fake machine.
    :ivar input_files: ``app-compose.json`` and ``sys-config.json`` in the tree.
    """

    machine: FakeSnpMachine


class FakeSnpMachine(_GuestMachine[FakeSnpKernelIO, FakeSnpAgent]):
    """A fake SEV-SNP guest rooted in a directory: build with :meth:`create`, reopen with
    the constructor (in any process), flip failure switches, change the launch measurement.

    For tests only: its reports are signed (if at all) by the VCEK of a
    :class:`~dstack_core.mockpki_amd.MockAmdPki` derived from the machine's seed, for its
    chip id and TCB (:meth:`vcek_public_key`; the chain in :meth:`trust_bundle`), and carry
    ``family_id`` ``DSTACK-FAKE-SNP``. They verify under that mock ARK, never under AMD's.
    """

    _kind = _SNP
    _io_type = FakeSnpKernelIO
    _agent_type = FakeSnpAgent

    paths: FakeSnpPaths
    profile: SnpKernelProfile

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        kernel: str = "6.10",
        vmpl: int = 0,
        measurement: bytes = DEFAULT_SNP_MEASUREMENT,
        host_data: bytes | None = None,
        policy: int = _SNP_DEFAULT_POLICY,
        guest_svn: int = 0,
        report_version: int = _SNP_REPORT_VERSION,
        sign: bool = True,
        seed: bytes | None = None,
        vmrk: bool = False,
        app_compose: str | None = None,
        sys_config: str | None = None,
        product: str = _SNP_DEFAULT_PRODUCT,
        tcb: int | None = None,
    ) -> FakeSnpMachine:
        """Lay out a freshly launched SNP guest under ``root`` (which must hold no tree).

        :param kernel: a :data:`SNP_KERNEL_PROFILES` name.
        :param vmpl: the VMPL the guest runs at (``privlevel_floor``; above 0 under an SVSM).
        :param measurement: the 48-byte launch measurement.
        :param host_data: the 32 bytes the host bound at launch (default: SHA-256 of the
            app-compose, a stand-in for dstack's MrConfigV3 binding).
        :param policy: the guest policy (default: SMT allowed, DEBUG clear).
        :param sign: sign reports with the fake VCEK (else the signature field is zero).
        :param seed: 32 bytes from which the chip secret and the fake VCEK derive.
        :param vmrk: whether a VM root key is installed (else VMRK derivation fails).
        :param product: ``Milan``, ``Genoa`` or ``Turin``: the CPUID in version 3+ reports,
            the shape of CHIP_ID (Turin: 8 bytes) and the TCB layout of the mock hierarchy.
        :param tcb: the TCB_VERSION word of every TCB field (default: one per product, in
            its layout).
        """
        cls._check_kernel(kernel)
        if not 0 <= vmpl <= _PRIVLEVEL_MAX:
            raise ValueError("vmpl must be 0..3")
        if len(measurement) != 48:
            raise ValueError("measurement must be 48 bytes")
        root = cls._new_tree(root)
        seed = secrets.token_bytes(32) if seed is None else seed
        if len(seed) != 32:
            raise ValueError("seed must be 32 bytes")
        if product not in MOCK_PRODUCTS:
            raise ValueError(f"product must be one of {', '.join(MOCK_PRODUCTS)}")
        chip_id = hashlib.sha512(b"fake-snp-chip-id" + seed).digest()
        chip_id = chip_id[: MOCK_PRODUCTS[product].hwid_size].ljust(len(chip_id), b"\0")
        compose_text = _default_app_compose() if app_compose is None else app_compose
        if host_data is None:
            host_data = hashlib.sha256(compose_text.encode()).digest()
        if len(host_data) != 32:
            raise ValueError("host_data must be 32 bytes")
        state = cls._new_state(
            kernel,
            vmpl=vmpl,
            seed=seed.hex(),
            vmrk=hashlib.sha256(b"fake-snp-vmrk" + seed).hexdigest() if vmrk else None,
            measurement=measurement.hex(),
            host_data=host_data.hex(),
            policy=policy,
            guest_svn=guest_svn,
            family_id=FAKE_SNP_FAMILY_ID.hex(),
            image_id=bytes(16).hex(),
            report_version=report_version,
            report_id=hashlib.sha256(b"fake-snp-report-id" + seed).hexdigest(),
            chip_id=chip_id.hex(),
            product=product,
            tcb=_SNP_DEFAULT_TCBS[product] if tcb is None else tcb,
            sign=sign,
            certs=None,
            copyback="success-only",
            vmpck_disabled=False,
            guest_errors=[],
            firmware_status=[],
        )
        cls._lay_out(root, state, app_compose=compose_text, sys_config=sys_config)
        return cls(root)

    # --- hardware ---

    def report(self, report_data: bytes, *, vmpl: int | None = None) -> bytes:
        """A report as the firmware would make it now (no kernel interface involved)."""
        with self._store.transaction() as state:
            return _snp_report(state, report_data, state["vmpl"] if vmpl is None else vmpl)

    def vcek_public_key(self) -> ec.EllipticCurvePublicKey:
        """The mock VCEK's public key (P-384): what verifies this machine's signatures."""
        with self._store.transaction() as state:
            return _pki(state).vcek_key(bytes.fromhex(state["chip_id"]), state["tcb"]).public_key()

    def trust_bundle(self) -> TrustBundle:
        """What verifies this machine's reports: the mock ARK as the root, the VCEK (for
        its chip and current TCB) and the ASK as SNP collateral."""
        with self._store.transaction() as state:
            return _pki(state).trust_bundle(bytes.fromhex(state["chip_id"]), state["tcb"])

    @property
    def chip_id(self) -> bytes:
        with self._store.transaction() as state:
            return bytes.fromhex(state["chip_id"])

    @property
    def tcb(self) -> int:
        """The TCB_VERSION every report carries (current, reported, committed, launch)."""
        with self._store.transaction() as state:
            return int(state["tcb"])

    @property
    def measurement(self) -> bytes:
        with self._store.transaction() as state:
            return bytes.fromhex(state["measurement"])

    @property
    def host_data(self) -> bytes:
        with self._store.transaction() as state:
            return bytes.fromhex(state["host_data"])

    @property
    def vmpck_disabled(self) -> bool:
        """Whether a transport failure has disabled the VMPCK (every request: ENOTTY)."""
        with self._store.transaction() as state:
            return bool(state["vmpck_disabled"])

    def relaunch(self, *, measurement: bytes | None = None, host_data: bytes | None = None,
                 policy: int | None = None) -> None:
        """Launch the guest again, optionally with another image, host data or policy.

        Clears a disabled VMPCK (a new launch has fresh keys), as a reboot does.
        """
        with self._store.transaction() as state:
            if measurement is not None:
                if len(measurement) != 48:
                    raise ValueError("measurement must be 48 bytes")
                state["measurement"] = measurement.hex()
            if host_data is not None:
                if len(host_data) != 32:
                    raise ValueError("host_data must be 32 bytes")
                state["host_data"] = host_data.hex()
            if policy is not None:
                state["policy"] = int(policy)
            state["vmpck_disabled"] = False

    # --- failure switches ---

    def inject_guest_error(
        self,
        *,
        fw_error: int = 0,
        vmm_error: int = 0,
        code: int = errno.EIO,
        times: int = 1,
        disable_vmpck: bool | None = None,
    ) -> None:
        """Fail the next ``times`` guest requests at the transport level.

        The ioctl fails with ``code`` and copies back ``exitinfo2 = vmm_error << 32 |
        fw_error``; the configfs path fails the report read with ``code``.

        :param disable_vmpck: whether the kernel then disables the VMPCK (every later
            request: ENOTTY until :meth:`reboot`); default: unless ``vmm_error`` is
            ``SNP_GUEST_VMM_ERR_INVALID_LEN``, the only non-fatal failure.
        """
        if disable_vmpck is None:
            disable_vmpck = vmm_error != SNP_GUEST_VMM_ERR_INVALID_LEN
        with self._store.transaction() as state:
            state["guest_errors"].append({
                "fw_error": int(fw_error), "vmm_error": int(vmm_error), "errno": int(code),
                "times": int(times), "disable_vmpck": bool(disable_vmpck),
            })

    def firmware_status(self, status: int, *, request: str = "any", times: int = 1) -> None:
        """The firmware answers the next ``times`` requests with a non-zero payload status
        (the ioctl succeeds, the response's ``status`` says it failed).

        :param request: ``report``, ``key`` or ``any``.
        """
        if request not in SNP_FIRMWARE_REQUESTS:
            raise ValueError(f"request must be one of {sorted(SNP_FIRMWARE_REQUESTS)}")
        with self._store.transaction() as state:
            state["firmware_status"].append(
                {"status": int(status), "request": request, "times": int(times)}
            )

    def reboot(self) -> None:
        """Re-enable a disabled VMPCK (the kernel only does so on reboot)."""
        with self._store.transaction() as state:
            state["vmpck_disabled"] = False

    def set_certs(self, table: bytes | None) -> None:
        """The certificate table the host supplies (auxblob, SNP_GET_EXT_REPORT), or none."""
        with self._store.transaction() as state:
            state["certs"] = None if table is None else table.hex()

    def set_copyback(self, mode: str) -> None:
        """How ``fcntl.ioctl`` treats buffers of up to 1024 bytes after a *failed* ioctl:
        ``success-only`` (CPython main, 2025+: the kernel's exitinfo2 is lost) or
        ``always`` (CPython 3.13 and older)."""
        if mode not in ("success-only", "always"):
            raise ValueError("copyback must be 'success-only' or 'always'")
        with self._store.transaction() as state:
            state["copyback"] = mode

    def _clear(self, state: dict[str, Any]) -> None:
        state["guest_errors"] = []
        state["firmware_status"] = []
        state["vmpck_disabled"] = False
