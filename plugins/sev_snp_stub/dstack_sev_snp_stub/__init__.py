"""The AMD SEV-SNP platform stub: an SNP guest's evidence and keys, and nothing it cannot do.

It talks to the Linux kernel of an SEV-SNP guest as the mainline interfaces define them:

* **reports** (``get_quote``, ``attest``): the bare 1184-byte SNP attestation report over
  the caller's 64 bytes, through configfs-tsm with the ``sev_guest`` provider (Linux 6.7+;
  :mod:`dstack_core.tsm` with :mod:`.configfs`) or the ``SNP_GET_REPORT`` ioctl on
  ``/dev/sev-guest`` (5.19+; :mod:`.device`);
* the **root key** (``derive_root_key``): ``SNP_GET_DERIVED_KEY`` with the launch
  measurement (and by default the guest policy) mixed in, so a different image gets a
  different key; the app's secp256k1 key and the P-256 app CA key are HKDF-derived from it
  together with the report's HOST_DATA (see :func:`root_key_from_derived`);
* **no runtime registers**: SNP has no RTMRs, so ``extend_rtmr`` and ``read_measurements``
  raise :class:`~dstack_core.errors.PlatformUnsupported` (EmitEvent answers 501
  ``platform_unsupported``), and the boot event log is empty.

What it does not do (the host's certificate table, SVSM reports, MrConfigV3 checks) is
listed in its README and ``docs/platforms/sev-snp.md``. Its reports are verified by
:mod:`.verify` (VCEK -> ASK -> AMD's pinned ARK, with collateral from :mod:`.kds`);
:meth:`SevSnpStubPlatform.trust_bundle` publishes the fake kernel's mock chain.

All paths hang off one ``root`` (default ``/``) and every syscall goes through a
:class:`~dstack_core.sysio.SysIO`, so the same code runs against the test-only fake kernel of
:mod:`dstack_core.testing.fake_tee`.

Options (``--platform-option KEY=VALUE``):

``root``
    Directory the kernel paths hang off (default ``/``).
``report``
    ``auto`` (default: configfs-tsm when its provider is ``sev_guest``, else the ioctl),
    ``configfs`` or ``ioctl``.
``vmpl``
    The VMPL reports and keys are requested at (default: configfs ``privlevel_floor``, or 0
    without configfs). Changing it changes the derived key.
``root_key``
    ``vcek`` (default) or ``vmrk``: the firmware root key the derived key comes from.
``key_fields``
    Comma-separated guest fields mixed into the derived key, from ``policy``, ``image_id``,
    ``family_id``, ``measurement``, ``guest_svn``, ``tcb_version``; ``measurement`` is
    mandatory (default ``policy,measurement``).
``commit_timeout``
    Seconds to wait for configfs to commit the report data (default 5).
``sysio``
    ``os`` (default) or ``fake``: the fake kernel, **for tests only**, refused unless
    ``DSTACK_ALLOW_FAKE_KERNEL=1`` is set in the environment.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from dstack_core import (
    ConfigurationError,
    DstackError,
    EvidenceError,
    InvalidRequest,
    KeyProvider,
    Measurements,
    PlatformConfig,
    PlatformError,
    PlatformEvidence,
    PlatformInfo,
    PlatformUnsupported,
    Quote,
    RootKey,
    TrustBundle,
    __version__,
    certs,
    hookimpl,
)
from dstack_core.eventlog import TdxEvent
from dstack_core.keys import derive_key
from dstack_core.platform_options import (
    ALLOW_FAKE_KERNEL_ENV,
    check_known,
    open_sysio,
    parse_root,
    parse_seconds,
    parse_sysio,
)
from dstack_core.snp import SnpReport
from dstack_core.sysio import SysIO
from dstack_core.tsm import (
    DEFAULT_COMMIT_TIMEOUT,
    MAX_COMMIT_TIMEOUT,
    REPORT_DIR,
    TsmReportClient,
    entry_failure,
)
from dstack_core.types import REPORT_DATA_LENGTH

from .abi import GUEST_FIELDS, ROOT_KEY_VCEK, ROOT_KEY_VMRK
from .configfs import SEV_GUEST, privlevel_attributes
from .device import MAX_VMPL, SevGuestDevice

__all__ = [
    "ALLOW_FAKE_KERNEL_ENV",
    "APP_KEY_LABEL",
    "CA_KEY_LABEL",
    "KEY_PROVIDER_NAME",
    "SevSnpStubOptions",
    "SevSnpStubPlatform",
    "root_key_from_derived",
]

PLUGIN: Final = "sev-snp-stub"
"""The plugin's name in option errors."""
SEV_GUEST_DEVICE: Final = PurePosixPath("dev/sev-guest")

APP_KEY_LABEL: Final = b"dstack-sev-snp-stub:app-key:v1"
"""HKDF info prefix of the app's secp256k1 key (followed by the report's HOST_DATA)."""
CA_KEY_LABEL: Final = b"dstack-sev-snp-stub:app-ca-key:v1"
"""HKDF info prefix of the app CA's P-256 key (followed by the report's HOST_DATA)."""
KEY_PROVIDER_NAME: Final = "sev-snp-derived"
"""The key provider's name; its id is the launch measurement in hex."""
CA_COMMON_NAME: Final = "dstack-core SEV-SNP App CA"
CA_NOT_AFTER: Final = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
"""The CA's notAfter: RFC 5280's "no well-defined expiration date", so that the CA, a pure
function of the derived key, is the same certificate on every start."""
DEFAULT_KEY_FIELDS: Final = ("policy", "measurement")
PROBE_REPORT_DATA: Final = b"dstack-sev-snp-stub:configure".ljust(REPORT_DATA_LENGTH, b"\0")
_SECP256K1_ORDER: Final = int(
    "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141", 16
)

log = logging.getLogger(__name__)

_REPORT_METHODS: Final = ("auto", "configfs", "ioctl")
_ROOT_KEYS: Final = {"vcek": ROOT_KEY_VCEK, "vmrk": ROOT_KEY_VMRK}


def _under(root: Path, path: PurePosixPath) -> Path:
    return root / path


@attrs.frozen(kw_only=True)
class SevSnpStubOptions:
    """The plugin's ``--platform-option`` settings, validated (see the module docstring)."""

    root: Path = Path("/")
    report: str = "auto"
    vmpl: int | None = None
    root_key: str = "vcek"
    key_fields: tuple[str, ...] = DEFAULT_KEY_FIELDS
    commit_timeout: float = DEFAULT_COMMIT_TIMEOUT
    sysio: str = "os"

    @property
    def field_select(self) -> int:
        """``guest_field_select`` for :attr:`key_fields`."""
        return sum(GUEST_FIELDS[name] for name in self.key_fields)

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> SevSnpStubOptions:
        """:raises ConfigurationError: an unknown option or a bad value."""
        known = {"root", "report", "vmpl", "root_key", "key_fields", "commit_timeout", "sysio"}
        check_known(PLUGIN, options, known)
        values: dict[str, object] = {}
        if "root" in options:
            values["root"] = parse_root(PLUGIN, options["root"])
        if "report" in options:
            if options["report"] not in _REPORT_METHODS:
                raise ConfigurationError(
                    f"sev-snp-stub option report must be one of {', '.join(_REPORT_METHODS)}, "
                    f"got {options['report']!r}"
                )
            values["report"] = options["report"]
        if "vmpl" in options:
            text = options["vmpl"]
            if not text.isdigit() or not 0 <= int(text) <= MAX_VMPL:
                raise ConfigurationError(
                    f"sev-snp-stub option vmpl must be 0..{MAX_VMPL}, got {text!r}"
                )
            values["vmpl"] = int(text)
        if "root_key" in options:
            if options["root_key"] not in _ROOT_KEYS:
                raise ConfigurationError(
                    f"sev-snp-stub option root_key must be vcek or vmrk, "
                    f"got {options['root_key']!r}"
                )
            values["root_key"] = options["root_key"]
        if "key_fields" in options:
            names = tuple(n.strip() for n in options["key_fields"].split(",") if n.strip())
            bad = [n for n in names if n not in GUEST_FIELDS]
            if bad:
                raise ConfigurationError(
                    f"sev-snp-stub option key_fields: unknown field(s) {bad}; "
                    f"known: {', '.join(GUEST_FIELDS)}"
                )
            if "measurement" not in names:
                raise ConfigurationError(
                    "sev-snp-stub option key_fields must include measurement: a key not bound "
                    "to the launch measurement could be derived by any image on this chip"
                )
            values["key_fields"] = tuple(dict.fromkeys(names))
        if "commit_timeout" in options:
            values["commit_timeout"] = parse_seconds(
                PLUGIN, "commit_timeout", options["commit_timeout"], maximum=MAX_COMMIT_TIMEOUT
            )
        if "sysio" in options:
            values["sysio"] = parse_sysio(PLUGIN, options["sysio"])
        return cls(**values)  # type: ignore[arg-type]


def _fake_kernel(root: Path) -> SysIO:
    from dstack_core.testing.fake_tee import FakeSnpKernelIO

    return FakeSnpKernelIO(root)


def _fake_trust_bundle(root: Path) -> TrustBundle:
    from dstack_core.testing.fake_tee import FakeSnpMachine

    return FakeSnpMachine(root).trust_bundle()


def _stable_ca(key: ec.EllipticCurvePrivateKey) -> certs.CertificateAuthority:
    """:func:`dstack_core.certs.new_app_ca` with a fixed validity, re-signed with
    deterministic ECDSA (RFC 6979), so the certificate's bytes depend on the key alone."""
    template = certs.new_app_ca(
        key, now=CA_NOT_AFTER - certs.DEFAULT_VALIDITY, common_name=CA_COMMON_NAME
    ).cert
    builder = x509.CertificateBuilder(
        issuer_name=template.issuer,
        subject_name=template.subject,
        public_key=template.public_key(),
        serial_number=template.serial_number,
        not_valid_before=template.not_valid_before_utc,
        not_valid_after=template.not_valid_after_utc,
        extensions=list(template.extensions),
    )
    cert = builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    return certs.CertificateAuthority(cert=cert, key=key)


def root_key_from_derived(derived: bytes, report: SnpReport) -> RootKey:
    """The app's root key material from a firmware-derived key and this guest's report.

    * ``k256_key`` = HKDF-SHA256(salt ``RATLS``, ``derived``, info = :data:`APP_KEY_LABEL`
      ‖ HOST_DATA), via :func:`dstack_core.keys.derive_key`;
    * the app CA key = :func:`dstack_core.certs.derive_p256_key` with info
      :data:`CA_KEY_LABEL` ‖ HOST_DATA; its certificate is :func:`dstack_core.certs.new_app_ca`'s
      shape with notAfter 9999-12-31 and a deterministic signature;
    * key provider ``{"name": "sev-snp-derived", "id": <measurement hex>}`` (kind ``Local``).

    HOST_DATA, which dstack's host sets to a hash of the app's configuration, separates
    apps launched from the same image on the same chip.

    :raises PlatformError: the derived scalar is not a valid secp256k1 key (about 2^-128).
    """
    k256 = derive_key(derived, [APP_KEY_LABEL, report.host_data])
    if not 0 < int.from_bytes(k256, "big") < _SECP256K1_ORDER:
        raise PlatformError("the derived app key is not a valid secp256k1 scalar")
    ca_key = certs.derive_p256_key(derived, [CA_KEY_LABEL, report.host_data])
    ca = _stable_ca(ca_key)
    return RootKey(
        k256_key=k256,
        ca_cert_pem=ca.cert_pem,
        key_provider=KeyProvider(
            kind="Local",
            name=KEY_PROVIDER_NAME,
            id=report.measurement.hex(),
            key_pem=certs.private_key_pem(ca_key),
        ),
    )


class SevSnpStubPlatform:
    """The ``sev-snp-stub`` platform plugin (one instance per agent).

    :param sysio: the syscall seam; None chooses from the ``sysio`` option at configure time
        (tests may pass a :class:`~dstack_core.testing.fake_tee.FakeSnpKernelIO` directly).
    """

    def __init__(self, sysio: SysIO | None = None) -> None:
        self._given_io = sysio
        self._lock = threading.Lock()
        self._device: SevGuestDevice | None = None
        self._configfs: TsmReportClient | None = None
        self._vmpl = 0
        self._root_key: RootKey | None = None
        self.method: str | None = None
        """``configfs`` or ``ioctl``: how reports are obtained, once configured."""

    @hookimpl
    def platform_info(self) -> PlatformInfo:
        return PlatformInfo(
            name="sev-snp-stub",
            tag="sev-snp",
            evidence_format="sev-snp",
            simulated=False,
            runtime_registers=False,
            description=(
                "AMD SEV-SNP guest (stub): reports via configfs-tsm or /dev/sev-guest, keys via "
                "SNP_GET_DERIVED_KEY; no runtime registers, no certificate table"
            ),
            version=__version__,
        )

    # --- lifecycle ---

    @hookimpl
    def configure(self, config: PlatformConfig) -> None:
        options = SevSnpStubOptions.parse(config.options)
        if config.appkeys is not None:
            raise ConfigurationError(
                "platform sev-snp-stub derives its keys from the SEV-SNP firmware "
                "(SNP_GET_DERIVED_KEY); it does not take app keys (--appkeys)"
            )
        io = self._given_io or open_sysio(PLUGIN, options.sysio, options.root, _fake_kernel)
        device_path = _under(options.root, SEV_GUEST_DEVICE)
        report_dir = _under(options.root, REPORT_DIR)
        if not io.exists(device_path):
            raise ConfigurationError(
                f"platform sev-snp-stub cannot start, this machine is not a usable SEV-SNP "
                f"guest; missing: {device_path} (the sev-guest driver, Linux 5.19+; key "
                "derivation has no other interface)"
            )
        device = SevGuestDevice(io, device_path)
        configfs, floor = self._choose_reports(io, report_dir, options)
        vmpl = options.vmpl if options.vmpl is not None else (floor or 0)
        if floor is not None and vmpl < floor:
            raise ConfigurationError(
                f"platform sev-snp-stub: vmpl {vmpl} is below the guest's own VMPL {floor} "
                "(privlevel_floor); the firmware refuses such requests"
            )
        self._device, self._configfs, self._vmpl = device, configfs, vmpl
        self.method = "configfs" if configfs is not None else "ioctl"
        try:
            report = SnpReport.from_bytes(self._report(PROBE_REPORT_DATA))
            derived = device.derived_key(
                root_key=_ROOT_KEYS[options.root_key],
                fields=options.field_select,
                vmpl=vmpl,
                guest_svn=report.guest_svn if "guest_svn" in options.key_fields else 0,
                tcb_version=report.committed_tcb if "tcb_version" in options.key_fields else 0,
            )
            root_key = root_key_from_derived(derived, report)
        except DstackError as exc:
            self._device = self._configfs = None
            raise ConfigurationError(f"platform sev-snp-stub cannot start: {exc.message}") from None
        if report.is_debug:
            log.warning(
                "the SNP guest policy allows DEBUG (policy %#x): the host can read and change "
                "guest memory, and verifiers reject this guest's reports", report.policy,
            )
        self._root_key = root_key
        log.info(
            "platform sev-snp-stub ready: root %s, reports via %s at VMPL %d, key from %s "
            "with %s, measurement %s",
            options.root, self.method, vmpl, options.root_key.upper(),
            "+".join(options.key_fields), report.measurement.hex(),
        )

    @staticmethod
    def _choose_reports(
        io: SysIO, report_dir: Path, options: SevSnpStubOptions
    ) -> tuple[TsmReportClient | None, int | None]:
        """The configfs report generator (or None for the ioctl) and ``privlevel_floor``
        (read from configfs when it is there, whichever way reports go, so that the default
        VMPL, and with it the derived key, does not depend on the report method)."""
        if options.report == "ioctl":
            floor = None
            if io.exists(report_dir):
                try:
                    probe = TsmReportClient(io, report_dir, SEV_GUEST).probe()
                except (OSError, ValueError):
                    probe = None
                if probe is not None and probe.provider == SEV_GUEST.name:
                    floor = probe.privlevel_floor
            return None, floor
        if not io.exists(report_dir):
            if options.report == "configfs":
                raise ConfigurationError(
                    f"platform sev-snp-stub cannot start: report=configfs but {report_dir} is "
                    "missing (configfs-tsm: Linux 6.7+ with configfs mounted at "
                    "/sys/kernel/config)"
                )
            log.info("no configfs-tsm at %s; SNP reports through the ioctl", report_dir)
            return None, None
        generator = TsmReportClient(
            io, report_dir, SEV_GUEST, commit_timeout=options.commit_timeout
        )
        try:
            probe = generator.probe()
        except OSError as exc:
            if exc.errno == errno.ENXIO and options.report == "auto":
                log.info("no configfs-tsm provider registered; SNP reports through the ioctl")
                return None, None
            raise ConfigurationError(
                f"platform sev-snp-stub cannot start: {entry_failure(report_dir, exc)}"
            ) from None
        except ValueError:
            raise ConfigurationError(
                f"platform sev-snp-stub cannot start: privlevel_floor in {report_dir} is "
                "not a number"
            ) from None
        if probe.provider != SEV_GUEST.name:
            raise ConfigurationError(
                f"platform sev-snp-stub cannot start: {SEV_GUEST.mismatch(probe.provider)} "
                "(select the platform of this TEE)"
            )
        return generator, probe.privlevel_floor

    @hookimpl
    def unconfigure(self) -> None:
        self._device = self._configfs = None
        self._root_key = None

    # --- evidence ---

    def _report(self, report_data: bytes) -> bytes:
        if self._device is None:
            raise PlatformError("platform sev-snp-stub was not configured")
        if len(report_data) != REPORT_DATA_LENGTH:
            raise InvalidRequest(
                f"SNP report data must be exactly {REPORT_DATA_LENGTH} bytes, "
                f"got {len(report_data)}"
            )
        with self._lock:
            if self._configfs is not None:
                report = self._configfs.report(
                    report_data, attributes=privlevel_attributes(self._vmpl)
                )
            else:
                report = self._device.report(report_data, vmpl=self._vmpl)
        try:
            parsed = SnpReport.from_bytes(report)
        except EvidenceError as exc:
            raise PlatformError(f"the firmware returned a malformed SNP report: {exc.message}") from None
        if parsed.report_data != report_data:
            raise PlatformError("the SNP report carries report data other than what was asked")
        return report

    @hookimpl
    def derive_root_key(self) -> RootKey:
        if self._root_key is None:
            raise ConfigurationError("platform sev-snp-stub was not configured: no key derived")
        return self._root_key

    @hookimpl
    def get_quote(self, report_data: bytes) -> Quote:
        return Quote(format="sev-snp", data=self._report(report_data))

    @hookimpl
    def attest(self, report_data: bytes) -> PlatformEvidence:
        return PlatformEvidence(quote=self.get_quote(report_data), boot_events=(), extra={})

    @hookimpl
    def boot_event_log(self) -> tuple[TdxEvent, ...]:
        return ()

    @hookimpl
    def read_measurements(self) -> Measurements:
        raise PlatformUnsupported(
            "SEV-SNP has no MRTD or RTMRs: the launch measurement is in the attestation "
            "report, and there are no runtime measurement registers"
        )

    @hookimpl
    def trust_bundle(self, state_dir: Path, options: Mapping[str, str]) -> TrustBundle | None:
        """None on hardware (reports verify against AMD's ARKs, pinned in
        :mod:`.amd`); on the test-only fake kernel (``sysio=fake``), the fake's mock AMD
        chain: its ARK as the root, its VCEK and ASK as collateral.

        :raises ConfigurationError: bad options, the fake kernel not allowed, or no fake
            SNP tree under ``root``.
        """
        parsed = SevSnpStubOptions.parse(options)
        if parsed.sysio != "fake":
            return None
        open_sysio(PLUGIN, parsed.sysio, parsed.root, _fake_kernel)
        try:
            return _fake_trust_bundle(parsed.root)
        except FileNotFoundError as exc:
            raise ConfigurationError(f"{PLUGIN} option sysio=fake: {exc}") from None

    @hookimpl
    def extend_rtmr(self, index: int, digest: bytes) -> None:
        raise PlatformUnsupported(
            "SEV-SNP has no runtime measurement registers: nothing can be extended, so "
            "EmitEvent is not available on platform sev-snp-stub"
        )
