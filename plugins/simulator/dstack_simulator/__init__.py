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
``appkeys.json`` (only when no ``--appkeys`` is given), ``simulator-machine.bin`` (the
registers, see :class:`MachineFile`). Options (``--platform-option``): ``quote_version=4|5``.

An extension is computed, saved durably, and only then published to quotes; a failed save
raises :class:`~dstack_core.errors.StorageError` and leaves the register where it was, so
the register the next start loads is always one the core was told about.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
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
    nonblocking,
)
from dstack_core.eventlog import LogBatch, RuntimeEvent, RuntimeEventLog, TdxEvent, extend, replay
from dstack_core.inputs import app_compose_document, document_text, sys_config_document
from dstack_core.mockpki import SIMULATOR_USER_DATA, MockIntelPki, QuoteSigner, mock_td_report
from dstack_core.statefile import (
    atomic_write,
    fsync_dir,
    is_storage_fault,
    read_or_create_secret,
    storage_error,
)
from dstack_core.types import TrustBundle

from .bootlog import SIMULATED_MRTD, synthetic_boot_log

__all__ = ["MachineFile", "SimulatorPlatform"]

log = logging.getLogger(__name__)

PKI_SEED_FILE: Final = "mock-pki.seed"
APPKEYS_FILE: Final = "appkeys.json"
MACHINE_FILE: Final = "simulator-machine.bin"
LEGACY_MACHINE_FILE: Final = "simulator-machine.json"
RUNTIME_RTMR: Final = 3
ZERO_RTMR: Final = bytes(48)
MR_CONFIG_ID_V1: Final = b"\x01"
SIMULATED_OS_IMAGE_HASH: Final = hashlib.sha256(b"dstack-core simulator os image").hexdigest()

DEFAULT_APP_COMPOSE: Final = app_compose_document("dstack-simulator-app")
DEFAULT_SYS_CONFIG: Final = sys_config_document(os_image_hash=SIMULATED_OS_IMAGE_HASH)


NOT_BOOTED: Final = bytes(32)
"""The boot-inputs digest of a machine whose boot did not finish."""


class MachineFile:
    """The simulated machine's registers, saved in place with one fdatasync per update.

    Two fixed-size slots (:data:`SLOT`), written alternately; each carries a sequence
    number and a SHA-256 over its fields. Loading takes the valid slot with the higher
    sequence number, so a write torn by a crash or a power cut leaves the previous state,
    and a write that failed (disk full, read-only) leaves it too. Not thread-safe: the
    platform serialises saves.
    """

    MAGIC: Final = b"DSTKSIM1"
    SLOT: Final = struct.Struct("<8sQ32s192s32s")
    """magic, sequence number, boot-inputs digest, RTMR0..3, SHA-256 of the fields before."""
    SLOT_SPACING: Final = 512

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sequence = 0

    def load(self) -> tuple[bytes, list[bytes]] | None:
        """``(boot_inputs, rtmrs)`` of the newest valid slot; None if there is no file.

        :raises StateError: the file exists but no slot is valid.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        best: tuple[int, bytes, bytes] | None = None
        for start in (0, self.SLOT_SPACING):
            chunk = data[start : start + self.SLOT.size]
            if len(chunk) != self.SLOT.size:
                continue
            magic, sequence, inputs, registers, digest = self.SLOT.unpack(chunk)
            checked = chunk[: -len(digest)]
            if magic != self.MAGIC or not hmac.compare_digest(
                hashlib.sha256(checked).digest(), digest
            ):
                continue
            if best is None or sequence > best[0]:
                best = (sequence, inputs, registers)
        if best is None:
            raise StateError(
                f"simulator state {self.path} is corrupt; start with --reset-state to boot a "
                "fresh machine"
            )
        self._sequence = best[0]
        registers = best[2]
        return best[1], [registers[i * 48 : (i + 1) * 48] for i in range(4)]

    def save(self, boot_inputs: bytes, rtmrs: list[bytes]) -> None:
        """Durably record the machine in the older slot.

        :raises OSError: nothing new is durable (the previous state still loads).
        """
        sequence = self._sequence + 1
        fields = (self.MAGIC, sequence, boot_inputs, b"".join(rtmrs))
        checked = self.SLOT.pack(*fields, bytes(32))[:-32]
        slot = checked + hashlib.sha256(checked).digest()
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, slot, (sequence % 2) * self.SLOT_SPACING)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        self._sequence = sequence


def _load_legacy_machine(path: Path) -> tuple[bytes, list[bytes]] | None:
    """The JSON machine file of dstack-core 0.1, still read once after an upgrade."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        rtmrs = doc["rtmrs"]
        if not (isinstance(rtmrs, list) and len(rtmrs) == 4 and isinstance(doc["boot_inputs"], str)
                and all(len(bytes.fromhex(r)) == 48 for r in rtmrs)):
            raise ValueError("bad register list")
        inputs = bytes.fromhex(doc["boot_inputs"]) if doc["boot_inputs"] else NOT_BOOTED
        return inputs, [bytes.fromhex(r) for r in rtmrs]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"simulator state {path} is corrupt ({exc}); "
            "start with --reset-state to boot a fresh machine"
        ) from None


def _write_default(path: Path, state_dir: Path, doc: dict[str, Any], what: str) -> None:
    if path.exists():
        return
    if path.parent.resolve() != state_dir.resolve():
        raise ConfigurationError(f"{what} file not found: {path}")
    atomic_write(path, document_text(doc).encode(), mode=0o644)


class SimulatorPlatform:
    """The ``simulator`` platform plugin (one instance per agent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards reading and publishing _rtmrs
        self._save_lock = threading.Lock()  # one extension (compute, save, publish) at a time
        self._pki: MockIntelPki | None = None
        self._root_key: RootKey | None = None
        self._machine: MachineFile | None = None
        self._legacy_machine: Path | None = None
        self._mrtd = SIMULATED_MRTD
        self._rtmrs: list[bytes] = [ZERO_RTMR] * 4
        self._boot_events: tuple[TdxEvent, ...] = ()
        self._signer: QuoteSigner | None = None
        self._save_failing = False
        self._quote_version = 4
        self._boot_inputs = NOT_BOOTED

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
        self._machine = MachineFile(state / MACHINE_FILE)
        self._legacy_machine = state / LEGACY_MACHINE_FILE
        if config.reset:
            self._reset(config)
        self._pki = MockIntelPki.from_seed(read_or_create_secret(state / PKI_SEED_FILE, 32))
        _write_default(config.app_compose, state, DEFAULT_APP_COMPOSE, "app-compose")
        _write_default(config.sys_config, state, DEFAULT_SYS_CONFIG, "sys-config")
        self._root_key = self._load_root_key(config)
        compose = config.app_compose.read_bytes()
        compose_hash = hashlib.sha256(compose).digest()
        mr_config_id = (MR_CONFIG_ID_V1 + compose_hash).ljust(48, b"\0")
        # Registers and report data are filled in per quote; the rest is encoded once.
        template = mock_td_report(
            mr_td=self._mrtd, rtmrs=[ZERO_RTMR] * 4, report_data=bytes(64),
            mr_config_id=mr_config_id,
        )
        self._signer = self._pki.quote_signer(
            template, user_data=SIMULATOR_USER_DATA, version=self._quote_version
        )
        self._boot_events = synthetic_boot_log()
        boot_inputs = self._boot_inputs_digest(compose_hash, self._root_key)
        machine = self._machine.load() or _load_legacy_machine(self._legacy_machine)
        if machine is not None and machine[0] == boot_inputs:
            self._boot_inputs, self._rtmrs = machine
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
        doomed = [config.state_dir / MACHINE_FILE, config.state_dir / LEGACY_MACHINE_FILE]
        if config.appkeys is None:
            doomed.append(config.state_dir / APPKEYS_FILE)
        for path in doomed:
            path.unlink(missing_ok=True)
        RuntimeEventLog(config.runtime_log).remove()

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
    def _boot_inputs_digest(compose_hash: bytes, root_key: RootKey) -> bytes:
        provider = root_key.key_provider.event_payload()
        return hashlib.sha256(compose_hash + provider + root_key.k256_key).digest()

    def _save_machine(self, boot_inputs: bytes, rtmrs: list[bytes]) -> None:
        """Save durably; only then are the new values this platform's state.

        :raises StorageError: the save failed; the previous state stands.
        """
        assert self._machine is not None and self._legacy_machine is not None
        try:
            self._machine.save(boot_inputs, rtmrs)
        except OSError as exc:
            if not is_storage_fault(exc):
                raise
            if not self._save_failing:  # once per incident, not per EmitEvent
                self._save_failing = True
                log.error("cannot save the simulated registers to %s: %s; RTMR3 stays where "
                          "it is until saving works again", self._machine.path, exc)
            raise storage_error(exc, "the simulated register could not be saved") from None
        if self._save_failing:
            self._save_failing = False
            log.warning("the simulated registers can be saved again")
        self._boot_inputs = boot_inputs
        with self._lock:
            self._rtmrs = rtmrs
        if self._legacy_machine.exists():
            with contextlib.suppress(OSError):
                self._legacy_machine.unlink()

    def _boot(self, config: PlatformConfig, compose_hash: bytes, boot_inputs: bytes) -> None:
        """Simulate firmware and dstack's boot: fresh registers, boot events into RTMR3."""
        assert self._root_key is not None
        runtime_log = RuntimeEventLog(config.runtime_log)
        runtime_log.remove()
        fresh = [replay(self._boot_events, i) for i in range(3)] + [ZERO_RTMR]
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
        # Until the last boot event is in, the saved machine carries no boot-inputs digest, so
        # a crash half-way through boots again next time instead of resuming a half-booted VM.
        self._save_machine(NOT_BOOTED, fresh)
        batch = LogBatch.at(0, 0, [RuntimeEvent(event=n, payload=p) for n, p in boot_events])
        runtime_log.write_ahead(batch)
        self.extend_rtmr_many(index=RUNTIME_RTMR, digests=tuple(e.digest for e in batch.events))
        runtime_log.append(batch)
        runtime_log.clear_ahead()
        self._save_machine(boot_inputs, self._rtmrs)
        log.info("simulated boot complete: app_id %s instance_id %s", app_id.hex(), instance_id.hex())

    # --- evidence ---

    @hookimpl
    @nonblocking
    def derive_root_key(self) -> RootKey:
        assert self._root_key is not None, "configure() was not called"
        return self._root_key

    @hookimpl
    @nonblocking
    def get_quote(self, report_data: bytes) -> Quote:
        assert self._signer is not None, "configure() was not called"
        with self._lock:
            rtmrs = self._rtmrs
        return Quote(format="tdx", data=self._signer.sign(rtmrs=rtmrs, report_data=report_data))

    @hookimpl
    @nonblocking
    def attest(self, report_data: bytes) -> PlatformEvidence:
        return PlatformEvidence(quote=self.get_quote(report_data), boot_events=self._boot_events)

    @hookimpl
    @nonblocking
    def boot_event_log(self) -> tuple[TdxEvent, ...]:
        return self._boot_events

    @hookimpl
    @nonblocking
    def read_measurements(self) -> Measurements:
        with self._lock:
            return Measurements(mrtd=self._mrtd, rtmrs=self._rtmrs)

    @hookimpl
    def extend_rtmr(self, index: int, digest: bytes) -> None:
        self.extend_rtmr_many(index=index, digests=(digest,))

    @hookimpl
    def extend_rtmr_many(self, index: int, digests: tuple[bytes, ...]) -> None:
        if index != RUNTIME_RTMR:
            raise InvalidRequest(f"only RTMR{RUNTIME_RTMR} may be extended, not RTMR{index}")
        for digest in digests:
            if len(digest) != 48:
                raise InvalidRequest(f"an RTMR digest is 48 bytes, got {len(digest)}")
        with self._save_lock:
            rtmrs = list(self._rtmrs)
            for digest in digests:
                rtmrs[index] = extend(rtmrs[index], digest)
            self._save_machine(self._boot_inputs, rtmrs)

    @hookimpl
    def trust_bundle(self, state_dir: Path) -> TrustBundle:
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            seed = read_or_create_secret(state_dir / PKI_SEED_FILE, 32)
        except OSError as exc:
            raise ConfigurationError(f"cannot use state dir {state_dir}: {exc}") from None
        from dstack_core.osimage import OsImagePolicy  # what verifiers need, not serve

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
