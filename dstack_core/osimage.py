"""Known OS images: what ties a TD's signed MRTD and RTMR0-2 to an ``os_image_hash``.

A TDX quote signs MRTD (the firmware) and RTMR0-2 (firmware configuration, kernel, command
line, initrd): together they identify the OS image a TD booted. The ``os_image_hash`` that
dstack configurations name (``vm_config``) is covered by no signature, and dstack's RTMR3
``os-image-hash`` event, where present, only says what the KMS accepted at boot. So the
verifier ties an app to a known OS only through an operator's policy of known images:

* a policy file, JSON (``docs/verify.md`` "OS image policy")::

      {"version": 1,
       "images": {"<os_image_hash, 64 hex>": {"mrtd": "<96 hex>", "rtmr0": "<96 hex>",
                                              "rtmr1": "<96 hex>", "rtmr2": "<96 hex>",
                                              "label": "optional text"}}}

* or the expected registers of one image (``--expect-mrtd``, ``--expect-rtmr N=HEX``).

:func:`check_os_image` compares the signed registers with the policy and decides which
``os_image_hash``, if any, the evidence binds. Pure functions over bytes; loading a file is
:meth:`OsImagePolicy.from_file`.
"""

from __future__ import annotations

import binascii
import hmac
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from . import strictjson
from .errors import ConfigurationError, EvidenceError

__all__ = [
    "OS_IMAGE_HASH_LENGTH",
    "OS_IMAGE_POLICY_VERSION",
    "OsImage",
    "OsImageOutcome",
    "OsImagePolicy",
    "check_os_image",
    "parse_rtmr_expectation",
    "stated_os_image_hash",
    "with_expectations",
]

OS_IMAGE_POLICY_VERSION: Final = 1
OS_IMAGE_HASH_LENGTH: Final = 32
"""``os_image_hash`` is SHA-256 (of the image's ``sha256sum.txt``)."""

MEASUREMENT_LENGTH: Final = 48
BOOT_RTMRS: Final = (0, 1, 2)
"""The registers an OS image determines; RTMR3 is dstack's runtime register."""

_IMAGE_KEYS: Final = frozenset({"mrtd", "rtmr0", "rtmr1", "rtmr2", "label"})
_REQUIRED_IMAGE_KEYS: Final = frozenset({"mrtd", "rtmr0", "rtmr1", "rtmr2"})
_POLICY_KEYS: Final = frozenset({"version", "images"})


def _hex(value: object, what: str, length: int) -> bytes:
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be a hex string")
    text = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        raw = binascii.a2b_hex(text)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{what} is not an even-length hex string") from None
    if len(raw) != length:
        raise ConfigurationError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def _measurement(_inst: object, attr: attrs.Attribute[Any], value: bytes | None) -> None:
    if value is not None and (type(value) is not bytes or len(value) != MEASUREMENT_LENGTH):
        raise ValueError(f"{attr.name} must be {MEASUREMENT_LENGTH} bytes")


def _rtmr_map(value: Mapping[int, bytes]) -> Mapping[int, bytes]:
    frozen = dict(value)
    for index, register in frozen.items():
        if index not in BOOT_RTMRS:
            raise ValueError(f"only RTMR0-2 describe an OS image, not RTMR{index}")
        if type(register) is not bytes or len(register) != MEASUREMENT_LENGTH:
            raise ValueError(f"RTMR{index} must be {MEASUREMENT_LENGTH} bytes")
    return dict(sorted(frozen.items()))


@attrs.frozen(kw_only=True)
class OsImage:
    """The registers one OS image measures.

    :ivar os_image_hash: the image's hash (32 bytes), or None for expectations given
        without one (``--expect-mrtd`` / ``--expect-rtmr``).
    :ivar mrtd: the expected MRTD, or None (not compared).
    :ivar rtmrs: expected RTMR0-2 by index; a missing index is not compared.
    :ivar label: a human name for messages, e.g. ``dstack-0.5.3``.
    """

    os_image_hash: bytes | None = None
    mrtd: bytes | None = attrs.field(default=None, validator=_measurement)
    rtmrs: Mapping[int, bytes] = attrs.field(factory=dict, converter=_rtmr_map)
    label: str = ""

    @property
    def name(self) -> str:
        """How messages refer to the image."""
        if self.os_image_hash is None:
            return "the expected registers"
        label = f" ({self.label})" if self.label else ""
        return f"image {self.os_image_hash.hex()}{label}"

    def differences(self, mrtd: bytes, rtmrs: Sequence[bytes]) -> list[str]:
        """The registers (``MRTD``, ``RTMR1``, ...) whose signed value differs from this image's."""
        wrong = []
        if self.mrtd is not None and not hmac.compare_digest(self.mrtd, mrtd):
            wrong.append("MRTD")
        for index, expected in self.rtmrs.items():
            if not hmac.compare_digest(expected, rtmrs[index]):
                wrong.append(f"RTMR{index}")
        return wrong

    def compared(self) -> list[str]:
        """The registers this image pins."""
        return (["MRTD"] if self.mrtd is not None else []) + [f"RTMR{i}" for i in self.rtmrs]


@attrs.frozen(kw_only=True)
class OsImagePolicy:
    """The OS images a relying party accepts.

    :ivar images: known images by hash (from a policy file); when non-empty, the signed
        registers must equal one of them.
    :ivar expected: registers that must hold whatever the image (the ``--expect-*``
        flags), or None.
    """

    images: tuple[OsImage, ...] = ()
    expected: OsImage | None = None

    def __attrs_post_init__(self) -> None:
        if not self.images and self.expected is None:
            raise ValueError("an OS image policy needs images or expected registers")
        if any(image.os_image_hash is None for image in self.images):
            raise ValueError("policy images are keyed by os_image_hash")

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "OS image policy") -> OsImagePolicy:
        """Parse the policy file format (see the module docstring).

        :raises ConfigurationError: not strict JSON, unknown or missing keys, a wrong
            version, hex of the wrong length, or no images.
        """
        try:
            doc = strictjson.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"{source} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) - _POLICY_KEYS or "images" not in doc:
            raise ConfigurationError(
                f'{source} must be an object {{"version": 1, "images": {{...}}}}'
            )
        version = doc.get("version", OS_IMAGE_POLICY_VERSION)
        if type(version) is not int or version != OS_IMAGE_POLICY_VERSION:
            raise ConfigurationError(f"{source}: unsupported version {version!r}")
        images = doc["images"]
        if not isinstance(images, dict) or not images:
            raise ConfigurationError(f"{source}: 'images' must be a non-empty object")
        parsed = []
        for key, entry in images.items():
            where = f"{source}: image {key!r}"
            image_hash = _hex(key, where, OS_IMAGE_HASH_LENGTH)
            if not isinstance(entry, dict):
                raise ConfigurationError(f"{where} must be an object")
            unknown = set(entry) - _IMAGE_KEYS
            missing = _REQUIRED_IMAGE_KEYS - set(entry)
            if unknown or missing:
                raise ConfigurationError(
                    f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
                )
            label = entry.get("label", "")
            if not isinstance(label, str):
                raise ConfigurationError(f"{where}: label must be a string")
            parsed.append(
                OsImage(
                    os_image_hash=image_hash,
                    mrtd=_hex(entry["mrtd"], f"{where} mrtd", MEASUREMENT_LENGTH),
                    rtmrs={
                        i: _hex(entry[f"rtmr{i}"], f"{where} rtmr{i}", MEASUREMENT_LENGTH)
                        for i in BOOT_RTMRS
                    },
                    label=label,
                )
            )
        return cls(images=tuple(parsed))

    @classmethod
    def from_file(cls, path: Path) -> OsImagePolicy:
        """:meth:`from_json` of a file.

        :raises ConfigurationError: unreadable, or as :meth:`from_json`.
        """
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read OS image policy {path}: {exc}") from None
        return cls.from_json(text, source=f"OS image policy {path}")

    @classmethod
    def single(
        cls, os_image_hash: bytes, mrtd: bytes, rtmrs: Sequence[bytes], *, label: str = ""
    ) -> OsImagePolicy:
        """A policy of one image (``rtmrs``: at least RTMR0-2; more are ignored)."""
        image = OsImage(
            os_image_hash=os_image_hash,
            mrtd=mrtd,
            rtmrs={i: rtmrs[i] for i in BOOT_RTMRS},
            label=label,
        )
        return cls(images=(image,))

    @classmethod
    def combine(
        cls, policy: OsImagePolicy | None, mrtd: bytes | None, rtmrs: Mapping[int, bytes]
    ) -> OsImagePolicy | None:
        """``policy`` with the expectations of ``--expect-mrtd``/``--expect-rtmr`` added;
        None when there is neither."""
        if mrtd is None and not rtmrs:
            return policy
        expected = OsImage(mrtd=mrtd, rtmrs=rtmrs)
        return cls(images=policy.images if policy else (), expected=expected)

    def to_json(self) -> dict[str, Any]:
        """The policy file document of :attr:`images` (expectations are not written)."""
        return {
            "version": OS_IMAGE_POLICY_VERSION,
            "images": {
                image.os_image_hash.hex(): {
                    "mrtd": (image.mrtd or b"").hex(),
                    **{f"rtmr{i}": r.hex() for i, r in image.rtmrs.items()},
                    **({"label": image.label} if image.label else {}),
                }
                for image in self.images
                if image.os_image_hash is not None
            },
        }


def with_expectations(
    policy: OsImagePolicy | None, mrtd: str | None, rtmrs: Iterable[str]
) -> OsImagePolicy | None:
    """``policy`` plus the expectations of ``--expect-mrtd HEX`` and ``--expect-rtmr N=HEX``
    (or the service's variables); None when there is neither.

    :raises ConfigurationError: bad hex or lengths, an index outside 0-2, one index given
        twice with different values.
    """
    expected: dict[int, bytes] = {}
    for text in rtmrs:
        index, value = parse_rtmr_expectation(text)
        if expected.setdefault(index, value) != value:
            raise ConfigurationError(f"--expect-rtmr {index} given twice with different values")
    expected_mrtd = None if mrtd is None else _hex(mrtd.strip(), "--expect-mrtd", MEASUREMENT_LENGTH)
    return OsImagePolicy.combine(policy, expected_mrtd, expected)


def parse_rtmr_expectation(text: str) -> tuple[int, bytes]:
    """``N=HEX`` of ``--expect-rtmr``: register index 0-2 and its 48 bytes.

    :raises ConfigurationError: another shape, an index outside 0-2, bad hex.
    """
    index, sep, value = text.partition("=")
    if not sep or index.strip() not in ("0", "1", "2"):
        raise ConfigurationError(
            f"--expect-rtmr takes N=HEX with N 0, 1 or 2 (RTMR3 is the runtime register), "
            f"got {text!r}"
        )
    return int(index), _hex(value.strip(), f"--expect-rtmr {index}", MEASUREMENT_LENGTH)


def stated_os_image_hash(vm_config: str) -> bytes | None:
    """The ``os_image_hash`` a vm_config (or a sys-config nesting it as the string
    ``vm_config``, as upstream reads it) states; None when it states none.

    :raises EvidenceError: a non-empty vm_config that is not strict JSON, or a hash that is
        not hex: the statement is unreadable (another parser might read something else).
    """
    if not vm_config.strip():
        return None
    try:
        doc = strictjson.loads(vm_config)
        if isinstance(doc, dict) and isinstance(doc.get("vm_config"), str):
            doc = strictjson.loads(doc["vm_config"])
    except ValueError as exc:
        raise EvidenceError(f"vm_config is not strict JSON: {exc}") from None
    value = doc.get("os_image_hash") if isinstance(doc, dict) else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise EvidenceError("vm_config os_image_hash is not a string")
    try:
        return binascii.a2b_hex(value)
    except (binascii.Error, ValueError):
        raise EvidenceError("vm_config os_image_hash is not hex") from None


OsImageStatus = Literal["pass", "fail", "skipped"]


@attrs.frozen(kw_only=True)
class OsImageOutcome:
    """What :func:`check_os_image` decided.

    :ivar status: ``pass`` (the registers are a known image), ``fail``, or ``skipped``
        (no policy: the OS image is unverified).
    :ivar detail: why, for humans.
    :ivar os_image_hash: the bound hash (from a matching policy image or the measured
        RTMR3 event), or ``b""``.
    :ivar verified: whether the signed registers were compared with a policy and matched.
    """

    status: OsImageStatus
    detail: str
    os_image_hash: bytes = b""
    verified: bool = False


UNVERIFIED: Final = (
    "UNVERIFIED: nothing ties the app to a known OS image; give an OS image policy "
    "(--os-image-policy, or --expect-mrtd/--expect-rtmr) to compare MRTD and RTMR0-2"
)


def _short(value: bytes) -> str:
    return value.hex() if len(value) <= 8 else f"{value[:8].hex()}…"


def _hashes(images: Iterable[OsImage]) -> list[bytes]:
    found: list[bytes] = []
    for image in images:
        if image.os_image_hash is not None and image.os_image_hash not in found:
            found.append(image.os_image_hash)
    return found


def check_os_image(
    policy: OsImagePolicy | None,
    *,
    mrtd: bytes,
    rtmrs: Sequence[bytes],
    measured: bytes | None,
    stated: bytes | None,
    stated_problem: str | None = None,
) -> OsImageOutcome:
    """Decide the ``os_image`` check and the ``os_image_hash`` the evidence binds.

    :param policy: the relying party's known images, or None (nothing to compare with).
    :param mrtd: the quote's signed MRTD.
    :param rtmrs: the quote's signed RTMR0-3.
    :param measured: the payload of the ``os-image-hash`` runtime event when RTMR3 replayed
        to the quote (bound), else None.
    :param stated: the vm_config's ``os_image_hash`` (bound by nothing), or None.
    :param stated_problem: why the vm_config could not be read, if it could not.
    """
    if measured is not None and stated is not None and stated != measured:
        return OsImageOutcome(
            status="fail",
            detail=(
                f"vm_config states os_image_hash {stated.hex()}, but RTMR3 measured "
                f"os-image-hash {measured.hex()}"
            ),
        )
    unread = f"; vm_config unreadable ({stated_problem})" if stated_problem else ""
    if policy is None:
        if measured is not None:
            return OsImageOutcome(
                status="skipped",
                detail=(
                    f"RTMR3 measured os-image-hash {measured.hex()} (bound to the quote by the "
                    f"replay), but {UNVERIFIED[len('UNVERIFIED: '):]}{unread}"
                ),
                os_image_hash=measured,
            )
        said = (
            f"; vm_config's os_image_hash {stated.hex()} is covered by no signature"
            if stated is not None
            else ""
        )
        return OsImageOutcome(status="skipped", detail=f"{UNVERIFIED}{said}{unread}")

    checked = []
    if policy.expected is not None:
        wrong = policy.expected.differences(mrtd, rtmrs)
        if wrong:
            return OsImageOutcome(
                status="fail",
                detail=f"signed {', '.join(wrong)} differ from the expected values",
            )
        checked.append(f"{', '.join(policy.expected.compared())} equal the expected values")
    bound = measured
    if policy.images:
        matching = [image for image in policy.images if not image.differences(mrtd, rtmrs)]
        hashes = _hashes(matching)
        if not matching:
            return OsImageOutcome(
                status="fail",
                detail=(
                    f"signed MRTD {_short(mrtd)} and RTMR0-2 match none of the "
                    f"{len(policy.images)} known OS images"
                ),
            )
        if measured is not None and measured not in hashes:
            return OsImageOutcome(
                status="fail",
                detail=(
                    f"RTMR3 measured os-image-hash {measured.hex()}, but the signed registers "
                    f"are those of {', '.join(h.hex() for h in hashes)}"
                ),
            )
        if measured is None:
            if len(hashes) == 1:
                bound = hashes[0]
            elif stated in hashes:
                bound = stated
            else:
                return OsImageOutcome(
                    status="fail",
                    detail=(
                        f"the signed registers match {len(hashes)} known images "
                        f"({', '.join(h.hex() for h in hashes)}) and nothing measured says "
                        "which one booted"
                    ),
                )
        if stated is not None and stated != bound:
            return OsImageOutcome(
                status="fail",
                detail=(
                    f"vm_config states os_image_hash {stated.hex()}, but the signed "
                    f"registers are those of {bound.hex() if bound else 'another image'}"
                ),
            )
        image = next(i for i in matching if i.os_image_hash == bound)
        checked.append(f"MRTD and RTMR0-2 are those of known {image.name}")
    elif measured is not None:
        checked.append(f"RTMR3 measured os-image-hash {measured.hex()}")
    return OsImageOutcome(
        status="pass", detail="; ".join(checked) + unread, os_image_hash=bound or b"",
        verified=True,
    )
