"""Frozen values that cross the plugin contract.

Every hook takes and returns these (or plain bytes); the platform façade checks the types
so a plugin that returns a dict or ``None`` is caught at the boundary, not deep in a handler.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final

import attrs

from .errors import ConfigurationError

__all__ = [
    "REPORT_DATA_LENGTH",
    "RTMR_LENGTH",
    "EvidenceFormat",
    "KEY_PROVIDER_KINDS",
    "PlatformInfo",
    "PlatformConfig",
    "Quote",
    "Measurements",
    "PlatformEvidence",
    "KeyProvider",
    "RootKey",
    "TrustBundle",
    "HARDWARE_TAGS",
    "is_hardware_tag",
    "EVIDENCE_FORMAT_PATTERN",
    "is_evidence_format",
]

REPORT_DATA_LENGTH: Final = 64
RTMR_LENGTH: Final = 48
ROOT_KEY_LENGTH: Final = 32
KMS_SIGNATURE_LENGTH: Final = 65

EvidenceFormat = Annotated[str, "an evidence format name"]
"""The byte format of a platform's hardware evidence: ``tdx`` (a TDX DCAP quote),
``sev-snp`` (an SNP report), or a vendor's own (``acme-cc``); the name a verifier plugin is
registered under in ``dstack_core.verifiers`` (:data:`EVIDENCE_FORMAT_PATTERN`). Before 0.2
only the first two existed."""

EVIDENCE_FORMAT_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
"""An evidence format name: lower-case letters, digits, ``.`` and ``-``, at most 63
characters."""


def is_evidence_format(name: object) -> bool:
    """Whether ``name`` is a well-formed evidence format name (:data:`EVIDENCE_FORMAT_PATTERN`)."""
    return isinstance(name, str) and EVIDENCE_FORMAT_PATTERN.fullmatch(name) is not None


def _length(*allowed: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: bytes) -> None:
        if len(value) not in allowed:
            raise ValueError(
                f"{type(instance).__name__}.{attribute.name} must be "
                f"{' or '.join(map(str, allowed))} bytes, got {len(value)}"
            )

    return check


HARDWARE_TAGS: Final = frozenset(
    {"tdx", "sev-snp", "sev", "snp", "gcp-tdx", "nitro-enclave", "aws-nitro-tpm"}
)
"""Platform tags that name real TEE hardware (ours and upstream's platform kinds)."""


def is_hardware_tag(tag: str) -> bool:
    """Whether a platform tag names real TEE hardware: one of :data:`HARDWARE_TAGS`, or one
    of them followed by ``-`` (``gcp-tdx-confidential-space``). A simulated platform never
    uses one; a verifier refuses one on evidence that is not what it names."""
    return any(tag == name or tag.startswith(f"{name}-") for name in HARDWARE_TAGS)


@attrs.frozen(kw_only=True)
class PlatformInfo:
    """Who the active platform is.

    :ivar name: the entry-point name it was selected by (``simulator``, ``tdx``, ...).
    :ivar tag: the platform tag written into attestation envelopes. A simulated platform
        must never use the tag of real hardware: the simulator says ``simulator``.
    :ivar evidence_format: the byte format of its quotes.
    :ivar simulated: True when the evidence is not backed by TEE hardware.
    :ivar runtime_registers: True when ``extend_rtmr`` can extend RTMR3 (EmitEvent works).
    :ivar description: one line for people (``dstack-agent platforms``, logs).
    :ivar version: the plugin's version.
    """

    name: str
    tag: str
    evidence_format: EvidenceFormat
    simulated: bool
    runtime_registers: bool = True
    description: str = ""
    version: str = ""


@attrs.frozen(kw_only=True)
class PlatformConfig:
    """What the core tells a platform at start-up (the ``configure`` hook).

    Paths are resolved by the core; a plugin creates its own files only below ``state_dir``.

    :ivar state_dir: a private, writable directory for the platform's durable state.
    :ivar runtime_log: the runtime (RTMR3) event log in upstream JSON-lines format. A
        platform that simulates the boot process appends dstack's boot events here.
    :ivar appkeys: upstream-format ``appkeys.json``, if one was given.
    :ivar app_compose: the app-compose file (its SHA-256 is the compose hash).
    :ivar sys_config: the sys-config file (carries ``vm_config``).
    :ivar options: platform-specific settings (``--platform-option KEY=VALUE``).
    :ivar reset: discard durable state and start as on a fresh machine.
    """

    state_dir: Path
    runtime_log: Path
    appkeys: Path | None = None
    app_compose: Path
    sys_config: Path
    options: Mapping[str, str] = attrs.field(factory=dict)
    reset: bool = False


@attrs.frozen(kw_only=True)
class Quote:
    """Hardware evidence over 64 bytes of report data.

    :ivar format: ``tdx`` (an Intel DCAP quote, v4 or v5), ``sev-snp`` (an SNP report), or
        a vendor's format (whose verifier plugin the vendor ships).
    :ivar data: the raw bytes as the hardware produced them.
    """

    format: EvidenceFormat
    data: bytes = attrs.field(validator=attrs.validators.min_len(1))


def _four_registers(value: Iterable[bytes]) -> tuple[bytes, bytes, bytes, bytes]:
    registers = tuple(value)
    if len(registers) != 4:
        raise ValueError(f"Measurements.rtmrs must be four registers, got {len(registers)}")
    return registers


@attrs.frozen(kw_only=True)
class Measurements:
    """Current measurement registers: MRTD and RTMR0..3, 48 bytes each.

    :ivar mrtd: the TD's build-time measurement.
    :ivar rtmrs: RTMR0..3; RTMR3 is the runtime register EmitEvent extends.
    """

    mrtd: bytes = attrs.field(validator=_length(RTMR_LENGTH))
    rtmrs: tuple[bytes, bytes, bytes, bytes] = attrs.field(converter=_four_registers)

    @rtmrs.validator
    def _check_rtmrs(self, attribute: attrs.Attribute[Any], value: tuple[bytes, ...]) -> None:
        if len(value) != 4 or any(len(r) != RTMR_LENGTH for r in value):
            raise ValueError("Measurements.rtmrs must be four 48-byte registers")


@attrs.frozen(kw_only=True)
class PlatformEvidence:
    """What ``attest`` returns: the platform's part of an attestation envelope.

    The core adds the runtime event log, app info and vm_config around it.

    :ivar quote: the hardware evidence over the requested report data.
    :ivar boot_events: firmware/boot events (RTMR0..2) in order, as JSON-able TdxEvents.
    :ivar extra: platform-specific, CBOR-encodable fields (e.g. an SNP certificate chain).
    """

    quote: Quote
    boot_events: tuple[Any, ...] = ()
    extra: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class KeyProvider:
    """Who provisioned the app keys, as the ``key-provider`` boot event reports it.

    :ivar kind: upstream's variant name, a key of :data:`KEY_PROVIDER_KINDS`: ``None``,
        ``Local``, ``Tpm`` or ``Kms``.
    :ivar name: the event's ``name``, that kind's value in :data:`KEY_PROVIDER_KINDS`:
        ``none``, ``local-sgx``, ``tpm`` or ``kms``.
    :ivar id: the event's ``id`` string (hex; empty for ``none``).
    :ivar key_pem: the CA private key for locally issued certificates, if any.
    :ivar url: ``Kms`` only: the KMS RPC base URL (``https://<kms>/prpc``).
    :ivar tmp_ca_cert_pem: ``Kms`` only: the KMS's temporary CA, which issues the agent's
        client certificate for mutual TLS.
    :ivar tmp_ca_key_pem: ``Kms`` only: that temporary CA's private key.
    """

    kind: str
    name: str
    id: str = ""
    key_pem: str | None = attrs.field(default=None, repr=False)
    url: str = ""
    tmp_ca_cert_pem: str = attrs.field(default="", repr=False)
    tmp_ca_key_pem: str = attrs.field(default="", repr=False)

    def event_payload(self) -> bytes:
        """The ``key-provider`` boot event payload: compact JSON, keys ``name``, ``id``."""
        return json.dumps({"name": self.name, "id": self.id}, separators=(",", ":")).encode()


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"key_provider field {key} must be a string")
    return value


KEY_PROVIDER_KINDS: Final[Mapping[str, str]] = {
    "None": "none",
    "Local": "local-sgx",
    "Tpm": "tpm",
    "Kms": "kms",
}
"""Key provider kinds (upstream's ``KeyProvider`` variants) and the ``name`` each has in the
``key-provider`` boot event: ``None`` (keys made up on the machine, no provider: the
simulator, development), ``Local`` (a local key provider such as upstream's SGX one, or
keys the hardware derives; ``id`` is its measurement and the CA key comes with it, so the
agent issues GetTlsKey certificates itself), ``Tpm`` (a TPM), ``Kms`` (dstack's KMS; ``id``
is the KMS root's public key, ``k256_signature`` the KMS's signature over the app key)."""


@attrs.frozen(kw_only=True)
class RootKey:
    """The app's root key material, as upstream's ``appkeys.json`` carries it.

    :ivar k256_key: the app's secp256k1 private key; every GetKey/Sign key derives from it.
    :ivar k256_signature: the KMS's 65-byte signature over the app public key, or empty.
    :ivar disk_crypt_key: the disk encryption key upstream's boot uses (unused by the agent).
    :ivar env_crypt_key: the key of encrypted environment variables (unused by the agent).
    :ivar gateway_app_id: the gateway's app id, when a KMS provisioned one.
    :ivar ca_cert_pem: the CA that issues GetTlsKey certificates.
    :ivar key_provider: who provisioned the keys (and the CA key for local providers).
    """

    k256_key: bytes = attrs.field(repr=False, validator=_length(ROOT_KEY_LENGTH))
    k256_signature: bytes = attrs.field(default=b"", validator=_length(0, KMS_SIGNATURE_LENGTH))
    disk_crypt_key: bytes = attrs.field(default=b"", repr=False)
    env_crypt_key: bytes = attrs.field(default=b"", repr=False)
    gateway_app_id: str = ""
    ca_cert_pem: str = ""
    key_provider: KeyProvider

    @classmethod
    def from_appkeys_json(cls, text: str | bytes) -> RootKey:
        """Parse upstream's ``appkeys.json`` (lowercase hex without ``0x``).

        :raises ConfigurationError: when the document is not a valid appkeys file.
        """
        try:
            doc = json.loads(text)
            provider_doc = doc["key_provider"]
            if not isinstance(provider_doc, dict) or len(provider_doc) != 1:
                raise ValueError("key_provider must have exactly one variant")
            ((kind, body),) = provider_doc.items()
            if kind not in KEY_PROVIDER_KINDS:
                raise ValueError(f"unknown key_provider variant {kind!r}")
            body = body or {}
            if kind == "Kms":
                provider_id = str(body.get("pubkey", ""))
            elif kind == "Local":
                provider_id = str(body.get("mr", ""))
            else:
                provider_id = ""
            kms = (
                {
                    "url": _text(body, "url"),
                    "tmp_ca_cert_pem": _text(body, "tmp_ca_cert"),
                    "tmp_ca_key_pem": _text(body, "tmp_ca_key"),
                }
                if kind == "Kms"
                else {}
            )
            provider = KeyProvider(
                kind=kind,
                name=KEY_PROVIDER_KINDS[kind],
                id=provider_id,
                key_pem=body.get("key"),
                **kms,
            )
            return cls(
                k256_key=bytes.fromhex(doc["k256_key"]),
                k256_signature=bytes.fromhex(doc.get("k256_signature", "")),
                disk_crypt_key=bytes.fromhex(doc.get("disk_crypt_key", "")),
                env_crypt_key=bytes.fromhex(doc.get("env_crypt_key", "")),
                gateway_app_id=str(doc.get("gateway_app_id", "")),
                ca_cert_pem=str(doc.get("ca_cert", "")),
                key_provider=provider,
            )
        except KeyError as exc:
            raise ConfigurationError(f"invalid appkeys.json: missing field {exc}") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"invalid appkeys.json: {exc}") from None

    def to_appkeys_json(self) -> str:
        """Serialise in upstream's ``appkeys.json`` format."""
        body: dict[str, str] = {}
        if self.key_provider.key_pem is not None:
            body["key"] = self.key_provider.key_pem
        if self.key_provider.kind == "Kms":
            # upstream's field order: url, pubkey, tmp_ca_key, tmp_ca_cert
            body["url"] = self.key_provider.url
            body["pubkey"] = self.key_provider.id
            body["tmp_ca_key"] = self.key_provider.tmp_ca_key_pem
            body["tmp_ca_cert"] = self.key_provider.tmp_ca_cert_pem
        elif self.key_provider.kind == "Local":
            body["mr"] = self.key_provider.id
        doc = {
            "disk_crypt_key": self.disk_crypt_key.hex(),
            "env_crypt_key": self.env_crypt_key.hex(),
            "k256_key": self.k256_key.hex(),
            "k256_signature": self.k256_signature.hex(),
            "gateway_app_id": self.gateway_app_id,
            "ca_cert": self.ca_cert_pem,
            "key_provider": {self.key_provider.kind: body},
        }
        return json.dumps(doc, indent=4) + "\n"


@attrs.frozen(kw_only=True)
class TrustBundle:
    """What a verifier needs to accept evidence signed by a test PKI (a simulated platform's,
    or fake hardware's); ``dstack-agent trust-bundle`` writes it as ``root_ca.pem``,
    ``collateral.json`` and, when set, ``os_image_policy.json``.

    :ivar root_ca_pem: the root certificate (PEM): the mock Intel root CA for ``tdx``
        evidence, the mock AMD ARK for ``sev-snp`` evidence.
    :ivar collateral_json: the collateral in the evidence format's JSON form: dcap-qvl's
        ``QuoteCollateralV3`` for ``tdx``; for ``sev-snp`` the VCEK and ASK in the document
        ``dstack-core/sev-snp-collateral`` (``docs/platforms/sev-snp.md``).
    :ivar os_image_policy_json: the OS image the platform simulates, as an OS image policy
        (``docs/verify.md``: its ``os_image_hash`` and the MRTD and RTMR0-2 it boots to),
        or None; with it a verifier can tie simulated apps to a known (simulated) OS.

    .. versionchanged:: 0.1 ``os_image_policy_json`` added (optional).
    """

    root_ca_pem: bytes
    collateral_json: str
    os_image_policy_json: str | None = None
