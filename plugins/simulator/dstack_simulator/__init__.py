"""The simulator platform: a dstack CVM in software, with real cryptography.

It plays both the hardware and dstack's boot process, so apps can be built and tested on a
laptop against the same API, keys and evidence formats as in a CVM:

* Quotes are structurally valid TDX v4 (or v5) quotes carrying the current registers and
  the caller's report data, signed by a deterministic mock Intel PKI. They verify with
  dcap-qvl against the simulator's published trust bundle and never against Intel's root;
  the header's user data says ``DSTACK-SIMULATOR`` and envelopes say ``simulator``.
* MRTD and RTMR0..2 come from a synthetic boot log; RTMR3 from dstack's boot events
  (derived from the app-compose, app keys and sys-config inputs) and every EmitEvent.
* Keys, registers and the event log are durable in the state dir: a restart continues
  where the last run stopped; ``--reset-state`` starts a fresh machine. Changing a measured
  input (the app-compose file or the app keys) re-boots the simulated machine.

State-dir files: ``mock-pki.seed`` (kept across resets: it is the simulated "Intel"),
``appkeys.json`` (only when no ``--appkeys`` is given), ``simulator-machine.json``.
Options (``--platform-option``): ``quote_version=4|5``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from dstack_core import (
    ConfigurationError,
    InvalidRequest,
    Measurements,
    PlatformConfig,
    PlatformEvidence,
    PlatformInfo,
    Quote,
    RootKey,
    StateError,
    __version__,
    certs,
    hookimpl,
)
from dstack_core.eventlog import RuntimeEvent, RuntimeEventLog, TdxEvent, extend, replay
from dstack_core.inputs import app_compose_document, document_text, sys_config_document
from dstack_core.mockpki import SIMULATOR_USER_DATA, MockIntelPki, mock_td_report
from dstack_core.osimage import OsImagePolicy
from dstack_core.statefile import atomic_write, read_or_create_secret
from dstack_core.types import TrustBundle

from .bootlog import SIMULATED_MRTD, synthetic_boot_log

__all__ = ["SimulatorPlatform"]

log = logging.getLogger(__name__)

PKI_SEED_FILE: Final = "mock-pki.seed"
APPKEYS_FILE: Final = "appkeys.json"
MACHINE_FILE: Final = "simulator-machine.json"
RUNTIME_RTMR: Final = 3
ZERO_RTMR: Final = bytes(48)
MR_CONFIG_ID_V1: Final = b"\x01"
SIMULATED_OS_IMAGE_HASH: Final = hashlib.sha256(b"dstack-core simulator os image").hexdigest()

DEFAULT_APP_COMPOSE: Final = app_compose_document("dstack-simulator-app")
DEFAULT_SYS_CONFIG: Final = sys_config_document(os_image_hash=SIMULATED_OS_IMAGE_HASH)


def _write_default(path: Path, state_dir: Path, doc: dict[str, Any], what: str) -> None:
    if path.exists():
        return
    if path.parent.resolve() != state_dir.resolve():
        raise ConfigurationError(f"{what} file not found: {path}")
    atomic_write(path, document_text(doc).encode(), mode=0o644)


class SimulatorPlatform:
    """The ``simulator`` platform plugin (one instance per agent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pki: MockIntelPki | None = None
        self._root_key: RootKey | None = None
        self._machine_file: Path | None = None
        self._mrtd = SIMULATED_MRTD
        self._rtmrs: list[bytes] = [ZERO_RTMR] * 4
        self._boot_events: tuple[TdxEvent, ...] = ()
        self._mr_config_id = bytes(48)
        self._quote_version = 4
        self._boot_inputs = ""

    @hookimpl
    def platform_info(self) -> PlatformInfo:
        return PlatformInfo(
            name="simulator",
            tag="simulator",
            evidence_format="tdx",
            simulated=True,
            runtime_registers=True,
            description="software TDX simulator signed by a mock Intel PKI (not hardware)",
            version=__version__,
        )

    # --- lifecycle ---

    @hookimpl
    def configure(self, config: PlatformConfig) -> None:
        state = config.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._quote_version = self._parse_quote_version(config.options)
        self._machine_file = state / MACHINE_FILE
        if config.reset:
            self._reset(config)
        self._pki = MockIntelPki.from_seed(read_or_create_secret(state / PKI_SEED_FILE, 32))
        _write_default(config.app_compose, state, DEFAULT_APP_COMPOSE, "app-compose")
        _write_default(config.sys_config, state, DEFAULT_SYS_CONFIG, "sys-config")
        self._root_key = self._load_root_key(config)
        compose = config.app_compose.read_bytes()
        compose_hash = hashlib.sha256(compose).digest()
        self._mr_config_id = (MR_CONFIG_ID_V1 + compose_hash).ljust(48, b"\0")
        self._boot_events = synthetic_boot_log()
        boot_inputs = self._boot_inputs_digest(compose_hash, self._root_key)
        machine = self._load_machine()
        if machine is not None and machine["boot_inputs"] == boot_inputs:
            self._rtmrs = [bytes.fromhex(r) for r in machine["rtmrs"]]
            self._boot_inputs = boot_inputs
            return
        if machine is not None:
            log.warning("measured inputs changed since the last boot: re-booting the simulated "
                        "machine (new registers and runtime event log)")
        self._boot(config, compose_hash, boot_inputs)

    @staticmethod
    def _parse_quote_version(options: dict[str, str] | Any) -> int:
        unknown = set(options) - {"quote_version"}
        if unknown:
            raise ConfigurationError(f"unknown simulator options: {sorted(unknown)}")
        value = options.get("quote_version", "4")
        if value not in ("4", "5"):
            raise ConfigurationError(f"quote_version must be 4 or 5, got {value!r}")
        return int(value)

    def _reset(self, config: PlatformConfig) -> None:
        log.warning("resetting simulator state in %s", config.state_dir)
        doomed = [config.state_dir / MACHINE_FILE, config.runtime_log,
                  config.runtime_log.with_name(config.runtime_log.name + ".pending")]
        if config.appkeys is None:
            doomed.append(config.state_dir / APPKEYS_FILE)
        for path in doomed:
            path.unlink(missing_ok=True)

    def _load_root_key(self, config: PlatformConfig) -> RootKey:
        path = config.appkeys or config.state_dir / APPKEYS_FILE
        if config.appkeys is None and not path.exists():
            root_key = certs.new_local_root_key(now=datetime.now(UTC))
            atomic_write(path, root_key.to_appkeys_json().encode(), mode=0o600)
            log.info("created new simulator app keys in %s", path)
            return root_key
        try:
            return RootKey.from_appkeys_json(path.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read appkeys {path}: {exc}") from None
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc.message}") from None

    @staticmethod
    def _boot_inputs_digest(compose_hash: bytes, root_key: RootKey) -> str:
        provider = root_key.key_provider.event_payload()
        return hashlib.sha256(compose_hash + provider + root_key.k256_key).hexdigest()

    def _load_machine(self) -> dict[str, Any] | None:
        assert self._machine_file is not None
        try:
            doc: dict[str, Any] = json.loads(self._machine_file.read_text())
            rtmrs = doc["rtmrs"]
            if not (isinstance(rtmrs, list) and len(rtmrs) == 4 and isinstance(doc["boot_inputs"], str)
                    and all(len(bytes.fromhex(r)) == 48 for r in rtmrs)):
                raise ValueError("bad register list")
            return doc
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"simulator state {self._machine_file} is corrupt ({exc}); "
                "start with --reset-state to boot a fresh machine"
            ) from None

    def _save_machine(self, boot_inputs: str) -> None:
        assert self._machine_file is not None
        doc = {"boot_inputs": boot_inputs, "rtmrs": [r.hex() for r in self._rtmrs]}
        atomic_write(self._machine_file, json.dumps(doc).encode(), mode=0o600)
        self._boot_inputs = boot_inputs

    def _boot(self, config: PlatformConfig, compose_hash: bytes, boot_inputs: str) -> None:
        """Simulate firmware and dstack's boot: fresh registers, boot events into RTMR3."""
        assert self._root_key is not None
        for path in (config.runtime_log, config.runtime_log.with_name(config.runtime_log.name + ".pending")):
            path.unlink(missing_ok=True)
        self._rtmrs = [replay(self._boot_events, i) for i in range(3)] + [ZERO_RTMR]
        app_id = compose_hash[:20]
        instance_seed = secrets.token_bytes(20)
        instance_id = hashlib.sha256(instance_seed + app_id).digest()[:20]
        boot_events = [
            ("system-preparing", b""),
            ("app-id", app_id),
            ("compose-hash", compose_hash),
            ("instance-id", instance_id),
            ("boot-mr-done", b""),
            ("key-provider", self._root_key.key_provider.event_payload()),
            ("system-ready", b""),
        ]
        runtime_log = RuntimeEventLog(config.runtime_log)
        # Until the last boot event is in, the saved machine carries no boot-inputs digest, so
        # a crash half-way through boots again next time instead of resuming a half-booted VM.
        self._save_machine("")
        for name, payload in boot_events:
            event = RuntimeEvent(event=name, payload=payload)
            runtime_log.begin(event)
            self.extend_rtmr(index=RUNTIME_RTMR, digest=event.digest)
            runtime_log.commit(event)
        self._save_machine(boot_inputs)
        log.info("simulated boot complete: app_id %s instance_id %s", app_id.hex(), instance_id.hex())

    # --- evidence ---

    @hookimpl
    def derive_root_key(self) -> RootKey:
        assert self._root_key is not None, "configure() was not called"
        return self._root_key

    @hookimpl
    def get_quote(self, report_data: bytes) -> Quote:
        assert self._pki is not None, "configure() was not called"
        with self._lock:
            rtmrs = tuple(self._rtmrs)
        report = mock_td_report(
            mr_td=self._mrtd, rtmrs=rtmrs, report_data=report_data, mr_config_id=self._mr_config_id
        )
        data = self._pki.sign_quote(report, user_data=SIMULATOR_USER_DATA, version=self._quote_version)
        return Quote(format="tdx", data=data)

    @hookimpl
    def attest(self, report_data: bytes) -> PlatformEvidence:
        return PlatformEvidence(quote=self.get_quote(report_data), boot_events=self._boot_events)

    @hookimpl
    def boot_event_log(self) -> tuple[TdxEvent, ...]:
        return self._boot_events

    @hookimpl
    def read_measurements(self) -> Measurements:
        with self._lock:
            return Measurements(mrtd=self._mrtd, rtmrs=self._rtmrs)

    @hookimpl
    def extend_rtmr(self, index: int, digest: bytes) -> None:
        if index != RUNTIME_RTMR:
            raise InvalidRequest(f"only RTMR{RUNTIME_RTMR} may be extended, not RTMR{index}")
        if len(digest) != 48:
            raise InvalidRequest(f"an RTMR digest is 48 bytes, got {len(digest)}")
        with self._lock:
            self._rtmrs[index] = extend(self._rtmrs[index], digest)
            self._save_machine(self._boot_inputs)

    @hookimpl
    def trust_bundle(self, state_dir: Path) -> TrustBundle:
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            seed = read_or_create_secret(state_dir / PKI_SEED_FILE, 32)
        except OSError as exc:
            raise ConfigurationError(f"cannot use state dir {state_dir}: {exc}") from None
        pki = MockIntelPki.from_seed(seed)
        boot = synthetic_boot_log()
        policy = OsImagePolicy.single(
            bytes.fromhex(SIMULATED_OS_IMAGE_HASH),
            SIMULATED_MRTD,
            [replay(boot, i) for i in range(3)],
            label="dstack-core simulator",
        )
        return TrustBundle(
            root_ca_pem=pki.root_ca_pem,
            collateral_json=pki.collateral_json(),
            os_image_policy_json=json.dumps(policy.to_json(), indent=2),
        )
