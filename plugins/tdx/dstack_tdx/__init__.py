"""The Intel TDX platform: what runs inside production dstack CVMs.

It talks to the Linux kernel of a TDX guest exactly as the mainline interfaces define them:

* **quotes** through configfs-tsm (``/sys/kernel/config/tsm/report``, Linux 6.7+), one
  private report entry per request, with the generation-counter checks
  (:mod:`dstack_core.tsm`, with the ``tdx_guest`` provider of :mod:`.configfs`);
* **RTMR3** through the tsm-mr sysfs file ``.../tdx_guest/measurements/rtmr3:sha384``
  (Linux 6.16+), or the Intel out-of-tree ioctl when explicitly allowed (:mod:`.registers`);
* the **boot event log** from the ACPI CCEL table (TCG2 crypto-agile, SHA-384), in
  measurement order, ahead of the runtime (RTMR3) log the core keeps;
* the **root key** from the app keys dstack's boot provisions (upstream ``appkeys.json``).

All paths hang off one ``root`` (default ``/``) and every syscall goes through a
:class:`~dstack_core.sysio.SysIO`, so the same code runs against the test-only fake kernel of
:mod:`dstack_core.testing.fake_tee`. ``configure`` fails closed with one message naming
everything that is missing.

Options (``--platform-option KEY=VALUE``):

``root``
    Directory the kernel paths hang off (default ``/``).
``appkeys``
    App keys below ``root`` (default ``/dstack/.host-shared/.appkeys.json``); the core's
    ``--appkeys`` overrides it with a path taken as is.
``legacy_ioctl``
    ``1`` to extend RTMR3 through ``TDX_CMD_EXTEND_RTMR`` on ``/dev/tdx_guest`` (Intel
    out-of-tree kernels) when the sysfs registers are missing; default ``0``.
``commit_timeout``
    Seconds to wait for the kernel to commit a quote's report data (default 5).
``quote_queue``
    How many quote requests may wait behind the one configfs-tsm is serving (default
    :data:`DEFAULT_QUOTE_QUEUE`); one more is answered 503 ``platform_busy`` at once.
``sysio``
    ``os`` (default) or ``fake``: the fake kernel, **for tests only**, refused unless
    ``DSTACK_ALLOW_FAKE_KERNEL=1`` is set in the environment.
"""

from __future__ import annotations

import errno
import hmac
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

from dstack_core import (
    ConfigurationError,
    EvidenceError,
    Measurements,
    PlatformConfig,
    PlatformError,
    PlatformEvidence,
    PlatformInfo,
    Quote,
    RootKey,
    __version__,
    hookimpl,
)
from dstack_core.ccel import CC_TYPE_TDX, parse_ccel, parse_ccel_table
from dstack_core.eventlog import ZERO_REGISTER, TdxEvent, replay
from dstack_core.kernel_errors import errno_name
from dstack_core.platform_options import (
    ALLOW_FAKE_KERNEL_ENV,
    check_known,
    open_sysio,
    parse_count,
    parse_flag,
    parse_root,
    parse_seconds,
    parse_sysio,
)
from dstack_core.sysio import SysIO
from dstack_core.tsm import (
    DEFAULT_COMMIT_TIMEOUT,
    MAX_COMMIT_TIMEOUT,
    TsmReportClient,
    entry_failure,
)

from .configfs import TDX_GUEST
from .paths import DEFAULT_APPKEYS, TdxPaths, under
from .registers import RUNTIME_RTMR, MeasurementRegisters

__all__ = ["ALLOW_FAKE_KERNEL_ENV", "DEFAULT_QUOTE_QUEUE", "TdxOptions", "TdxPlatform"]

PRODUCTION_RUNTIME_LOG: Final = "/run/log/dstack/runtime_events.log"
DEFAULT_QUOTE_QUEUE: Final = 4
"""Quote requests that may wait; with the one in progress this stays below the core's
worker threads on a two-CPU guest, so a slow quote service never starves extensions."""
MAX_QUOTE_QUEUE: Final = 1024
PLUGIN: Final = "tdx"
"""The plugin's name in option errors."""

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class TdxOptions:
    """The plugin's ``--platform-option`` settings, validated (see the module docstring)."""

    root: Path = Path("/")
    appkeys: str = "/" + str(DEFAULT_APPKEYS)
    legacy_ioctl: bool = False
    commit_timeout: float = DEFAULT_COMMIT_TIMEOUT
    quote_queue: int = DEFAULT_QUOTE_QUEUE
    sysio: str = "os"

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> TdxOptions:
        """:raises ConfigurationError: an unknown option or a bad value."""
        check_known(
            PLUGIN,
            options,
            {"root", "appkeys", "legacy_ioctl", "commit_timeout", "quote_queue", "sysio"},
        )
        values: dict[str, object] = {}
        if "root" in options:
            values["root"] = parse_root(PLUGIN, options["root"])
        if "appkeys" in options:
            values["appkeys"] = options["appkeys"]
        if "legacy_ioctl" in options:
            values["legacy_ioctl"] = parse_flag(PLUGIN, "legacy_ioctl", options["legacy_ioctl"])
        if "commit_timeout" in options:
            values["commit_timeout"] = parse_seconds(
                PLUGIN, "commit_timeout", options["commit_timeout"], maximum=MAX_COMMIT_TIMEOUT
            )
        if "quote_queue" in options:
            values["quote_queue"] = parse_count(
                PLUGIN, "quote_queue", options["quote_queue"], maximum=MAX_QUOTE_QUEUE
            )
        if "sysio" in options:
            values["sysio"] = parse_sysio(PLUGIN, options["sysio"])
        return cls(**values)  # type: ignore[arg-type]


def _fake_kernel(root: Path) -> SysIO:
    from dstack_core.testing.fake_tee import FakeKernelIO

    return FakeKernelIO(root)


class TdxPlatform:
    """The ``tdx`` platform plugin (one instance per agent).

    :param sysio: the syscall seam; None chooses from the ``sysio`` option at configure time
        (tests may pass a :class:`~dstack_core.testing.fake_tee.FakeKernelIO` directly).
    """

    def __init__(self, sysio: SysIO | None = None) -> None:
        self._given_io = sysio
        self._io: SysIO | None = None
        self._paths: TdxPaths | None = None
        self._quotes: TsmReportClient | None = None
        self._registers: MeasurementRegisters | None = None
        self._boot_events: tuple[TdxEvent, ...] = ()
        self._root_key: RootKey | None = None

    @hookimpl
    def platform_info(self) -> PlatformInfo:
        return PlatformInfo(
            name="tdx",
            tag="tdx",
            evidence_format="tdx",
            simulated=False,
            runtime_registers=True,
            description="Intel TDX guest: configfs-tsm quotes, RTMR3 via sysfs, ACPI CCEL boot log",
            version=__version__,
        )

    # --- lifecycle ---

    @hookimpl
    def configure(self, config: PlatformConfig) -> None:
        options = TdxOptions.parse(config.options)
        io = self._given_io or open_sysio(PLUGIN, options.sysio, options.root, _fake_kernel)
        paths = TdxPaths(options.root)
        appkeys = config.appkeys if config.appkeys is not None else under(options.root, options.appkeys)
        measurements_dir = next(
            (d for d in (paths.measurements_dir, paths.class_measurements_dir)
             if io.exists(d / f"rtmr{RUNTIME_RTMR}:sha384")),
            None,
        )
        self._check_present(io, paths, options, measurements_dir, appkeys)
        quotes = TsmReportClient(
            io,
            paths.report_dir,
            TDX_GUEST,
            commit_timeout=options.commit_timeout,
            queue_size=options.quote_queue,
        )
        self._check_provider(quotes, paths)
        registers = MeasurementRegisters(io, measurements_dir=measurements_dir, device=paths.device)
        boot_events = self._load_boot_log(io, paths)
        try:
            measurements = registers.read()
        except PlatformError as exc:
            raise ConfigurationError(f"platform tdx cannot start: {exc.message}") from None
        self._check_boot_replay(boot_events, measurements)
        if measurements.rtmrs[RUNTIME_RTMR] != ZERO_REGISTER and not config.runtime_log.exists():
            raise ConfigurationError(
                f"RTMR3 was already extended at boot, but the runtime event log "
                f"{config.runtime_log} does not exist: pass --runtime-log with the log dstack's "
                f"boot wrote ({PRODUCTION_RUNTIME_LOG})"
            )
        try:
            root_key = RootKey.from_appkeys_json(appkeys.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read app keys {appkeys}: {exc.strerror}") from None
        self._io, self._paths, self._quotes, self._registers = io, paths, quotes, registers
        self._boot_events, self._root_key = boot_events, root_key
        log.info(
            "platform tdx ready: root %s, RTMR3 via %s, %d boot events",
            options.root, registers.method, len(boot_events),
        )

    @staticmethod
    def _check_present(
        io: SysIO,
        paths: TdxPaths,
        options: TdxOptions,
        measurements_dir: Path | None,
        appkeys: Path,
    ) -> None:
        missing = []
        if not io.exists(paths.report_dir):
            missing.append(
                f"{paths.report_dir} (configfs-tsm quotes: Linux 6.7+ with configfs mounted "
                "at /sys/kernel/config)"
            )
        if measurements_dir is None:
            if not options.legacy_ioctl:
                missing.append(
                    f"{paths.measurements_dir}/rtmr3:sha384 (RTMR3 extension: Linux 6.16+; on "
                    "an Intel out-of-tree kernel set --platform-option legacy_ioctl=1)"
                )
            elif not io.exists(paths.device):
                missing.append(f"{paths.device} (legacy_ioctl=1 extends RTMR3 through it)")
        if not io.exists(paths.ccel_data):
            missing.append(f"{paths.ccel_data} (the boot event log: Linux 6.4+ on TDVF firmware)")
        if not appkeys.exists():
            missing.append(
                f"{appkeys} (the app keys dstack's boot provisions; or pass --appkeys)"
            )
        if missing:
            raise ConfigurationError(
                "platform tdx cannot start, this machine is not a usable Intel TDX guest; "
                "missing: " + "; ".join(missing)
            )

    @staticmethod
    def _check_provider(quotes: TsmReportClient, paths: TdxPaths) -> None:
        try:
            provider = quotes.probe().provider
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise ConfigurationError(
                    f"platform tdx cannot start: no TEE quote provider is registered with "
                    f"configfs-tsm (ENXIO creating an entry in {paths.report_dir}): the "
                    "tdx_guest driver is not loaded, or this is not a TDX guest"
                ) from None
            raise ConfigurationError(
                f"platform tdx cannot start: {entry_failure(paths.report_dir, exc)}"
            ) from None
        if provider != TDX_GUEST.name:
            raise ConfigurationError(
                f"platform tdx cannot start: {TDX_GUEST.mismatch(provider)} "
                "(select the platform of this TEE)"
            )

    @staticmethod
    def _load_boot_log(io: SysIO, paths: TdxPaths) -> tuple[TdxEvent, ...]:
        try:
            data = io.read(paths.ccel_data)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the boot event log {paths.ccel_data}: {exc.strerror} "
                f"({errno_name(exc.errno)}; the file is root-only)"
            ) from None
        if io.exists(paths.ccel_table):
            try:
                table = parse_ccel_table(io.read(paths.ccel_table))
            except (OSError, EvidenceError) as exc:
                raise ConfigurationError(f"bad ACPI CCEL table {paths.ccel_table}: {exc}") from None
            if table.cc_type != CC_TYPE_TDX:
                raise ConfigurationError(
                    f"the ACPI CCEL table says CC type {table.cc_type}, not TDX ({CC_TYPE_TDX})"
                )
            if table.laml != len(data):
                log.warning("CCEL log area is %d bytes but the table says LAML %d",
                            len(data), table.laml)
        try:
            return parse_ccel(data)
        except EvidenceError as exc:
            raise ConfigurationError(
                f"the boot event log {paths.ccel_data} is malformed: {exc.message}"
            ) from None

    @staticmethod
    def _check_boot_replay(events: tuple[TdxEvent, ...], measurements: Measurements) -> None:
        for index in range(RUNTIME_RTMR):
            replayed = replay(events, index)
            if not hmac.compare_digest(replayed, measurements.rtmrs[index]):
                log.error(
                    "the CCEL boot log does not replay to RTMR%d (replay %s, register %s): "
                    "verifiers will reject this machine's evidence",
                    index, replayed.hex(), measurements.rtmrs[index].hex(),
                )

    # --- evidence ---

    def _ready(self) -> tuple[TsmReportClient, MeasurementRegisters]:
        if self._quotes is None or self._registers is None:
            raise PlatformError("platform tdx was not configured")
        return self._quotes, self._registers

    @hookimpl
    def derive_root_key(self) -> RootKey:
        if self._root_key is None:
            raise ConfigurationError("platform tdx was not configured: no app keys loaded")
        return self._root_key

    @hookimpl
    def get_quote(self, report_data: bytes) -> Quote:
        quotes, _ = self._ready()
        return Quote(format="tdx", data=quotes.report(report_data))

    @hookimpl
    def attest(self, report_data: bytes) -> PlatformEvidence:
        return PlatformEvidence(quote=self.get_quote(report_data), boot_events=self._boot_events)

    @hookimpl
    def boot_event_log(self) -> tuple[TdxEvent, ...]:
        return self._boot_events

    @hookimpl
    def read_measurements(self) -> Measurements:
        _, registers = self._ready()
        return registers.read()

    @hookimpl
    def extend_rtmr(self, index: int, digest: bytes) -> None:
        _, registers = self._ready()
        registers.extend(index, digest)
