"""AMD SEV-SNP attestation reports: the byte layout as named offsets, and a strict parser.

An SNP report (``ATTESTATION_REPORT`` of the SEV-SNP firmware ABI) is exactly 1184
(``0x4A0``) bytes, little-endian. The firmware signs bytes ``0x000..0x29F`` with the chip's
VCEK (or the VLEK) using ECDSA P-384 with SHA-384; the signature sits at ``0x2A0`` as R and
S, each 72 bytes little-endian, followed by zeros. Sources: the project note
``linux-tee-interfaces.md`` section 4.2 (google/go-sev-guest ``abi/abi.go``) and
``formats.md`` section 2.1.

Every offset lives here; the rest of dstack-core never slices report bytes by hand.

Contract of the parser (:meth:`SnpReport.from_bytes`): pure (no I/O, no clock), and every
malformed input raises :class:`~dstack_core.errors.EvidenceError`, never ``IndexError`` or
``struct.error``. Parsing proves nothing about authenticity: that needs the VCEK
certificate chain up to AMD's root (ARK -> ASK -> VCEK), which the SEV-SNP platform
package verifies (``dstack_sev_snp_stub.verify``). :meth:`SnpReport.verify_signature`
checks the signature against a public key the caller already trusts, and nothing more.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .errors import EvidenceError

__all__ = [
    "AUTHOR_KEY_DIGEST_OFFSET",
    "CHIP_ID_OFFSET",
    "CHIP_ID_SIZE",
    "COMMITTED_TCB_OFFSET",
    "COMMITTED_VERSION_OFFSET",
    "CPUID_OFFSET",
    "CURRENT_TCB_OFFSET",
    "CURRENT_VERSION_OFFSET",
    "FAMILY_ID_OFFSET",
    "GUEST_SVN_OFFSET",
    "HOST_DATA_OFFSET",
    "HOST_DATA_SIZE",
    "ID_KEY_DIGEST_OFFSET",
    "IMAGE_ID_OFFSET",
    "LAUNCH_TCB_OFFSET",
    "MEASUREMENT_OFFSET",
    "MEASUREMENT_SIZE",
    "PLATFORM_INFO_CIPHERTEXT_HIDING_EN",
    "PLATFORM_INFO_ECC_EN",
    "PLATFORM_INFO_OFFSET",
    "PLATFORM_INFO_RAPL_DIS",
    "PLATFORM_INFO_SMT_EN",
    "PLATFORM_INFO_TSME_EN",
    "POLICY_ABI_MASK",
    "POLICY_CIPHERTEXT_HIDING",
    "POLICY_CXL_ALLOW",
    "POLICY_DEBUG",
    "POLICY_MEM_AES_256_XTS",
    "POLICY_MIGRATE_MA",
    "POLICY_OFFSET",
    "POLICY_PAGE_SWAP_DISABLE",
    "POLICY_RAPL_DIS",
    "POLICY_RESERVED_ONE",
    "POLICY_SINGLE_SOCKET",
    "POLICY_SMT",
    "REPORTED_TCB_OFFSET",
    "REPORT_DATA_OFFSET",
    "REPORT_DATA_SIZE",
    "REPORT_ID_MA_OFFSET",
    "REPORT_ID_OFFSET",
    "REPORT_SIZE",
    "REPORT_VERSIONS",
    "SIGNATURE_ALGO_ECDSA_P384_SHA384",
    "SIGNATURE_ALGO_OFFSET",
    "SIGNATURE_COMPONENT_SIZE",
    "SIGNATURE_OFFSET",
    "SIGNATURE_SIZE",
    "SIGNED_SIZE",
    "SIGNER_INFO_AUTHOR_KEY_EN",
    "SIGNER_INFO_MASK_CHIP_KEY",
    "SIGNER_INFO_OFFSET",
    "SIGNER_INFO_RESERVED_MASK",
    "SIGNER_INFO_SIGNING_KEY_MASK",
    "SIGNER_INFO_SIGNING_KEY_SHIFT",
    "SIGNING_KEY_NONE",
    "SIGNING_KEY_VCEK",
    "SIGNING_KEY_VLEK",
    "VERSION_OFFSET",
    "VMPL_OFFSET",
    "SnpReport",
    "build_report",
    "encode_signature",
    "is_snp_report",
]

REPORT_SIZE: Final = 0x4A0
"""1184 bytes: every SNP attestation report, whatever its version."""
REPORT_VERSIONS: Final = frozenset({2, 3, 4, 5})
"""Report versions this module understands (2: ABI 1.51; 3 adds the CPUID FMS; 5 the
mitigation vectors). The fields used here sit at the same offsets in all of them."""

VERSION_OFFSET: Final = 0x000
GUEST_SVN_OFFSET: Final = 0x004
POLICY_OFFSET: Final = 0x008
FAMILY_ID_OFFSET: Final = 0x010
IMAGE_ID_OFFSET: Final = 0x020
VMPL_OFFSET: Final = 0x030
SIGNATURE_ALGO_OFFSET: Final = 0x034
CURRENT_TCB_OFFSET: Final = 0x038
PLATFORM_INFO_OFFSET: Final = 0x040
SIGNER_INFO_OFFSET: Final = 0x048
REPORT_DATA_OFFSET: Final = 0x050
MEASUREMENT_OFFSET: Final = 0x090
HOST_DATA_OFFSET: Final = 0x0C0
ID_KEY_DIGEST_OFFSET: Final = 0x0E0
AUTHOR_KEY_DIGEST_OFFSET: Final = 0x110
REPORT_ID_OFFSET: Final = 0x140
REPORT_ID_MA_OFFSET: Final = 0x160
REPORTED_TCB_OFFSET: Final = 0x180
CPUID_OFFSET: Final = 0x188
"""Version 3+: CPUID family, model, stepping (one byte each)."""
CHIP_ID_OFFSET: Final = 0x1A0
COMMITTED_TCB_OFFSET: Final = 0x1E0
CURRENT_VERSION_OFFSET: Final = 0x1E8
"""Firmware build, minor, major (one byte each) then a reserved byte."""
COMMITTED_VERSION_OFFSET: Final = 0x1EC
LAUNCH_TCB_OFFSET: Final = 0x1F0
LAUNCH_MIT_VECTOR_OFFSET: Final = 0x1F8
CURRENT_MIT_VECTOR_OFFSET: Final = 0x200
SIGNATURE_OFFSET: Final = 0x2A0

FAMILY_ID_SIZE: Final = 16
IMAGE_ID_SIZE: Final = 16
REPORT_DATA_SIZE: Final = 64
MEASUREMENT_SIZE: Final = 48
HOST_DATA_SIZE: Final = 32
KEY_DIGEST_SIZE: Final = 48
REPORT_ID_SIZE: Final = 32
CHIP_ID_SIZE: Final = 64
SIGNATURE_SIZE: Final = 512
SIGNATURE_COMPONENT_SIZE: Final = 72
"""R and S are each 72 bytes little-endian (P-384 needs 48; the rest is zero)."""
SIGNED_SIZE: Final = SIGNATURE_OFFSET
"""The signature covers bytes ``0x000..0x29F``."""
assert SIGNATURE_OFFSET + SIGNATURE_SIZE == REPORT_SIZE

SIGNATURE_ALGO_ECDSA_P384_SHA384: Final = 1

POLICY_SMT: Final = 1 << 16
"""Guest policy: SMT is allowed."""
POLICY_RESERVED_ONE: Final = 1 << 17
"""Guest policy: reserved, must be one."""
POLICY_MIGRATE_MA: Final = 1 << 18
"""Guest policy: association with a migration agent is allowed."""
POLICY_DEBUG: Final = 1 << 19
"""Guest policy: debugging is allowed (the host can read and change guest memory)."""
POLICY_SINGLE_SOCKET: Final = 1 << 20
"""Guest policy: the guest may run on a single socket only."""
POLICY_CXL_ALLOW: Final = 1 << 21
"""Guest policy: CXL memory may be attached to the guest."""
POLICY_MEM_AES_256_XTS: Final = 1 << 22
"""Guest policy: memory encryption must use AES-256-XTS."""
POLICY_RAPL_DIS: Final = 1 << 23
"""Guest policy: the platform must have RAPL (running average power limit) disabled."""
POLICY_CIPHERTEXT_HIDING: Final = 1 << 24
"""Guest policy: the platform must hide DRAM ciphertext from the host."""
POLICY_PAGE_SWAP_DISABLE: Final = 1 << 25
"""Guest policy: the host may not swap the guest's pages out (SNP_PAGE_MOVE etc. refused)."""
POLICY_ABI_MASK: Final = 0xFFFF
"""Guest policy bits 0-15: the minimum firmware ABI, minor (bits 0-7) and major (8-15)."""

PLATFORM_INFO_SMT_EN: Final = 1 << 0
"""Platform info: SMT is enabled on the host."""
PLATFORM_INFO_TSME_EN: Final = 1 << 1
"""Platform info: transparent SME is enabled."""
PLATFORM_INFO_ECC_EN: Final = 1 << 2
"""Platform info: the platform uses ECC memory (reported when the firmware supports it)."""
PLATFORM_INFO_RAPL_DIS: Final = 1 << 3
"""Platform info: RAPL is disabled."""
PLATFORM_INFO_CIPHERTEXT_HIDING_EN: Final = 1 << 4
"""Platform info: DRAM ciphertext hiding is enabled."""

SIGNER_INFO_AUTHOR_KEY_EN: Final = 1 << 0
"""Signer info: the guest was launched with an ID block carrying an author key."""
SIGNER_INFO_MASK_CHIP_KEY: Final = 1 << 1
"""Signer info: the host masked the chip key (MASK_CHIP_KEY): the VCEK did not sign."""
SIGNER_INFO_SIGNING_KEY_SHIFT: Final = 2
SIGNER_INFO_SIGNING_KEY_MASK: Final = 0b111
"""Signer info bits 2-4: which key signed the report (:data:`SIGNING_KEY_VCEK`, ...)."""
SIGNER_INFO_RESERVED_MASK: Final = 0xFFFFFFE0
"""Signer info bits 5-31: must be zero."""
SIGNING_KEY_VCEK: Final = 0
SIGNING_KEY_VLEK: Final = 1
SIGNING_KEY_NONE: Final = 7

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_P384_ORDER_BITS: Final = 384


def _u32(data: bytes, offset: int) -> int:
    return int(_U32.unpack_from(data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    return int(_U64.unpack_from(data, offset)[0])


def _field(data: bytes, offset: int, size: int) -> bytes:
    return bytes(data[offset : offset + size])


def _le_int(data: bytes) -> int:
    return int.from_bytes(data, "little")


def is_snp_report(data: bytes) -> bool:
    """Whether ``data`` has the shape of an SNP report: 1184 bytes, a known version."""
    return len(data) == REPORT_SIZE and _u32(data, VERSION_OFFSET) in REPORT_VERSIONS


@attrs.frozen(kw_only=True)
class SnpReport:
    """A parsed SEV-SNP attestation report. Build with :meth:`from_bytes`.

    TCB values (``current_tcb`` and friends) are the raw 64-bit ``TCB_VERSION`` words; their
    split into components depends on the CPU generation and is not interpreted here.

    :ivar raw: the 1184 bytes as given.
    :ivar signature_r: the signature's R as an integer (from 72 little-endian bytes).
    :ivar signature_s: the signature's S.
    """

    raw: bytes = attrs.field(repr=False)
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    chip_id: bytes
    committed_tcb: int
    launch_tcb: int
    signature_r: int = attrs.field(repr=False)
    signature_s: int = attrs.field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> SnpReport:
        """Parse and structurally validate a report.

        :raises EvidenceError: not exactly 1184 bytes, or an unknown report version.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise EvidenceError(f"an SNP report must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise EvidenceError(
                f"an SEV-SNP attestation report is {REPORT_SIZE} bytes, got {len(data)}"
            )
        version = _u32(data, VERSION_OFFSET)
        if version not in REPORT_VERSIONS:
            raise EvidenceError(
                f"unknown SEV-SNP report version {version} "
                f"(known: {', '.join(map(str, sorted(REPORT_VERSIONS)))})"
            )
        r = _le_int(_field(data, SIGNATURE_OFFSET, SIGNATURE_COMPONENT_SIZE))
        s = _le_int(
            _field(data, SIGNATURE_OFFSET + SIGNATURE_COMPONENT_SIZE, SIGNATURE_COMPONENT_SIZE)
        )
        return cls(
            raw=data,
            version=version,
            guest_svn=_u32(data, GUEST_SVN_OFFSET),
            policy=_u64(data, POLICY_OFFSET),
            family_id=_field(data, FAMILY_ID_OFFSET, FAMILY_ID_SIZE),
            image_id=_field(data, IMAGE_ID_OFFSET, IMAGE_ID_SIZE),
            vmpl=_u32(data, VMPL_OFFSET),
            signature_algo=_u32(data, SIGNATURE_ALGO_OFFSET),
            current_tcb=_u64(data, CURRENT_TCB_OFFSET),
            platform_info=_u64(data, PLATFORM_INFO_OFFSET),
            signer_info=_u32(data, SIGNER_INFO_OFFSET),
            report_data=_field(data, REPORT_DATA_OFFSET, REPORT_DATA_SIZE),
            measurement=_field(data, MEASUREMENT_OFFSET, MEASUREMENT_SIZE),
            host_data=_field(data, HOST_DATA_OFFSET, HOST_DATA_SIZE),
            id_key_digest=_field(data, ID_KEY_DIGEST_OFFSET, KEY_DIGEST_SIZE),
            author_key_digest=_field(data, AUTHOR_KEY_DIGEST_OFFSET, KEY_DIGEST_SIZE),
            report_id=_field(data, REPORT_ID_OFFSET, REPORT_ID_SIZE),
            report_id_ma=_field(data, REPORT_ID_MA_OFFSET, REPORT_ID_SIZE),
            reported_tcb=_u64(data, REPORTED_TCB_OFFSET),
            chip_id=_field(data, CHIP_ID_OFFSET, CHIP_ID_SIZE),
            committed_tcb=_u64(data, COMMITTED_TCB_OFFSET),
            launch_tcb=_u64(data, LAUNCH_TCB_OFFSET),
            signature_r=r,
            signature_s=s,
        )

    @property
    def is_debug(self) -> bool:
        """Whether the guest policy allows debugging (policy bit 19)."""
        return bool(self.policy & POLICY_DEBUG)

    @property
    def signing_key(self) -> int:
        """SIGNING_KEY of ``signer_info``: :data:`SIGNING_KEY_VCEK` (0), ``_VLEK`` (1) or
        ``_NONE`` (7); 2-6 are reserved."""
        return (self.signer_info >> SIGNER_INFO_SIGNING_KEY_SHIFT) & SIGNER_INFO_SIGNING_KEY_MASK

    @property
    def signed_region(self) -> bytes:
        """The bytes the firmware signs: ``0x000..0x29F``."""
        return self.raw[:SIGNED_SIZE]

    @property
    def signature(self) -> bytes:
        """The raw 512-byte signature field."""
        return self.raw[SIGNATURE_OFFSET:]

    @property
    def cpuid_fms(self) -> tuple[int, int, int] | None:
        """``(family, model, stepping)`` from version 3 on; None for version 2."""
        if self.version < 3:
            return None
        family, model, stepping = self.raw[CPUID_OFFSET : CPUID_OFFSET + 3]
        return family, model, stepping

    def verify_signature(self, public_key: ec.EllipticCurvePublicKey) -> None:
        """Check the report's signature with a P-384 public key the caller already trusts.

        This checks the signature only: whether ``public_key`` is this chip's genuine VCEK
        (its certificate chain up to AMD's ARK) is the caller's business.

        :raises EvidenceError: an algorithm other than ECDSA P-384/SHA-384, a key on another
            curve, or a signature that does not verify.
        """
        if self.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
            raise EvidenceError(
                f"SNP report signature algorithm {self.signature_algo} is not ECDSA P-384 "
                f"with SHA-384 ({SIGNATURE_ALGO_ECDSA_P384_SHA384})"
            )
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP384R1
        ):
            raise EvidenceError("an SNP report is signed with a P-384 key")
        r, s = self.signature_r, self.signature_s
        if not (0 < r < 1 << _P384_ORDER_BITS and 0 < s < 1 << _P384_ORDER_BITS):
            raise EvidenceError("the SNP report signature is empty or out of range")
        try:
            public_key.verify(
                encode_dss_signature(r, s), self.signed_region, ec.ECDSA(hashes.SHA384())
            )
        except InvalidSignature:
            raise EvidenceError("the SNP report signature does not verify") from None

    def to_json(self) -> dict[str, Any]:
        """The fields a person reads, bytes in lowercase hex, integers as numbers."""
        return {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": f"{self.policy:#x}",
            "debug": self.is_debug,
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": f"{self.current_tcb:#018x}",
            "reported_tcb": f"{self.reported_tcb:#018x}",
            "committed_tcb": f"{self.committed_tcb:#018x}",
            "launch_tcb": f"{self.launch_tcb:#018x}",
            "platform_info": f"{self.platform_info:#x}",
            "signer_info": f"{self.signer_info:#x}",
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "chip_id": self.chip_id.hex(),
        }


def encode_signature(r: int, s: int) -> bytes:
    """The 512-byte signature field for ``(r, s)``: 72-byte little-endian R, S, zeros."""
    return (
        r.to_bytes(SIGNATURE_COMPONENT_SIZE, "little")
        + s.to_bytes(SIGNATURE_COMPONENT_SIZE, "little")
    ).ljust(SIGNATURE_SIZE, b"\0")


_BYTE_FIELDS: Final = {
    "family_id": (FAMILY_ID_OFFSET, FAMILY_ID_SIZE),
    "image_id": (IMAGE_ID_OFFSET, IMAGE_ID_SIZE),
    "report_data": (REPORT_DATA_OFFSET, REPORT_DATA_SIZE),
    "measurement": (MEASUREMENT_OFFSET, MEASUREMENT_SIZE),
    "host_data": (HOST_DATA_OFFSET, HOST_DATA_SIZE),
    "id_key_digest": (ID_KEY_DIGEST_OFFSET, KEY_DIGEST_SIZE),
    "author_key_digest": (AUTHOR_KEY_DIGEST_OFFSET, KEY_DIGEST_SIZE),
    "report_id": (REPORT_ID_OFFSET, REPORT_ID_SIZE),
    "report_id_ma": (REPORT_ID_MA_OFFSET, REPORT_ID_SIZE),
    "chip_id": (CHIP_ID_OFFSET, CHIP_ID_SIZE),
    "signature": (SIGNATURE_OFFSET, SIGNATURE_SIZE),
}
_INT_FIELDS: Final = {
    "version": (VERSION_OFFSET, _U32),
    "guest_svn": (GUEST_SVN_OFFSET, _U32),
    "policy": (POLICY_OFFSET, _U64),
    "vmpl": (VMPL_OFFSET, _U32),
    "signature_algo": (SIGNATURE_ALGO_OFFSET, _U32),
    "current_tcb": (CURRENT_TCB_OFFSET, _U64),
    "platform_info": (PLATFORM_INFO_OFFSET, _U64),
    "signer_info": (SIGNER_INFO_OFFSET, _U32),
    "reported_tcb": (REPORTED_TCB_OFFSET, _U64),
    "committed_tcb": (COMMITTED_TCB_OFFSET, _U64),
    "launch_tcb": (LAUNCH_TCB_OFFSET, _U64),
}


def build_report(**fields: Any) -> bytes:
    """An unsigned 1184-byte report with the given fields (others zero), for tests and tools.

    Defaults: ``version`` 3, ``signature_algo`` 1, ``policy`` with the must-be-one bit.
    Byte fields shorter than their slot are zero-padded on the right.

    :raises ValueError: an unknown field, or a byte field longer than its slot.
    """
    values: dict[str, Any] = {
        "version": 3,
        "signature_algo": SIGNATURE_ALGO_ECDSA_P384_SHA384,
        "policy": POLICY_RESERVED_ONE,
        **fields,
    }
    report = bytearray(REPORT_SIZE)
    for name, value in values.items():
        if name in _INT_FIELDS:
            offset, layout = _INT_FIELDS[name]
            layout.pack_into(report, offset, value)
        elif name in _BYTE_FIELDS:
            offset, size = _BYTE_FIELDS[name]
            if len(value) > size:
                raise ValueError(f"{name} is {size} bytes at most, got {len(value)}")
            report[offset : offset + len(value)] = value
        else:
            raise ValueError(f"unknown SNP report field {name!r}")
    return bytes(report)
