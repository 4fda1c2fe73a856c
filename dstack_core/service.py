"""The agent's behaviour, endpoint by endpoint, independent of HTTP.

:class:`AgentService` implements what each API method means (agent-api.md semantics) on top
of the platform façade, the durable runtime log and the pure crypto modules. The HTTP layer
only parses requests into arguments and serialises the frozen results.

Concurrency: quote generation, event emission and event-log reads share one lock, so that
the RTMR values inside a quote always equal the replay of the log returned with it, and an
EmitEvent is extended and durably appended before anyone else sees the register move.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from . import __version__, certs, keys, upstream
from .appinfo import DEVICE_ID_UNVERIFIED, derive_app_info
from .envelope import AppInfo, Envelope
from .errors import (
    ConfigurationError,
    DstackError,
    InvalidRequest,
    PlatformUnsupported,
    ReportDataTooLong,
)
from .eventlog import RuntimeEvent, RuntimeEventLog, TdxEvent, events_to_json
from .kms import DEFAULT_KMS_TIMEOUT, KmsClient, KmsSettings, config_for
from .platform import Platform
from .quote import TdxQuote
from .types import REPORT_DATA_LENGTH, PlatformConfig, RootKey

__all__ = [
    "AgentService",
    "AttestationFormat",
    "ServiceFiles",
    "ServiceOptions",
    "QuoteResult",
    "InfoResult",
    "TlsKeyResult",
    "TlsKeyRequest",
    "pad_report_data",
]

log = logging.getLogger(__name__)

GPU_ATTESTATION_FILE: Final = Path("/run/nvidia-gpu-attestation/attestation.out")
DMI_DIR: Final = Path("/sys/class/dmi/id")
DEMO_CERT_SUBJECT: Final = "demo-cert"
APP_DATA_TAG: Final = "app-data"
MAX_EVENT_NAME: Final = 256
INFO_CERT_WAIT: Final = 3.0
"""Seconds Info waits for a KMS-issued ``app_cert`` before answering without it."""

AttestationFormat = Literal["dstack-core", "upstream"]
"""What Attest, RA-TLS certificates and GetQuote's ``attestation`` carry: our CBOR envelope,
or upstream's V0/V1 ``VersionedAttestation``."""


def pad_report_data(data: bytes) -> bytes:
    """Right-pad report data with zeros to 64 bytes.

    :raises ReportDataTooLong: more than 64 bytes.
    """
    if len(data) > REPORT_DATA_LENGTH:
        raise ReportDataTooLong(
            f"Report data is too long: {len(data)} bytes, at most {REPORT_DATA_LENGTH}"
        )
    return data.ljust(REPORT_DATA_LENGTH, b"\0")


@attrs.frozen(kw_only=True)
class ServiceFiles:
    """Files the service reads besides the platform's own."""

    gpu_attestation: Path = GPU_ATTESTATION_FILE
    dmi_dir: Path = DMI_DIR


@attrs.frozen(kw_only=True)
class ServiceOptions:
    """Agent-wide choices (``serve`` flags).

    :ivar attestation_format: see :data:`AttestationFormat`.
    :ivar kms_timeout: seconds one KMS SignCert exchange may take.
    """

    attestation_format: AttestationFormat = "dstack-core"
    kms_timeout: float = DEFAULT_KMS_TIMEOUT


@attrs.frozen(kw_only=True)
class QuoteResult:
    """GetQuote's answer; ``attestation`` is set (and ``quote`` empty) on platforms whose
    evidence is not a TDX quote, as upstream answers there."""

    quote: bytes
    event_log: str
    report_data: bytes
    vm_config: str
    attestation: bytes = b""


@attrs.frozen(kw_only=True)
class TlsKeyRequest:
    """GetTlsKey arguments, validated."""

    subject: str = ""
    alt_names: tuple[str, ...] = ()
    usage_ra_tls: bool = False
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    not_before: int | None = None
    not_after: int | None = None
    with_app_info: bool = False


@attrs.frozen(kw_only=True)
class TlsKeyResult:
    key: str = attrs.field(repr=False)
    certificate_chain: tuple[str, ...]


@attrs.frozen(kw_only=True)
class InfoResult:
    app_id: bytes
    instance_id: bytes
    app_cert: str
    tcb_info: str
    app_name: str
    device_id: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    key_provider_info: str
    compose_hash: bytes
    vm_config: str
    cloud_vendor: str
    cloud_product: str


@attrs.frozen(kw_only=True)
class _Snapshot:
    """A quote and the event log that replays to its registers, taken under the lock."""

    quote: bytes
    boot_events: tuple[TdxEvent, ...]
    runtime_events: tuple[TdxEvent, ...]
    extra: dict[str, object]

    @property
    def events(self) -> tuple[TdxEvent, ...]:
        return self.boot_events + self.runtime_events


class AgentService:
    """Everything the agent API does. Build with :meth:`start`."""

    def __init__(
        self,
        *,
        platform: Platform,
        runtime_log: RuntimeEventLog,
        runtime_events: Sequence[RuntimeEvent],
        root_key: RootKey,
        app_compose: str,
        vm_config: str,
        files: ServiceFiles,
        options: ServiceOptions | None = None,
    ) -> None:
        self.platform = platform
        self.options = options or ServiceOptions()
        self._log = runtime_log
        # A tuple, replaced on append: snapshots (every quote) far outnumber appends.
        self._runtime_events = tuple(e.to_tdx_event() for e in runtime_events)
        self._root_key = root_key
        self._ca = _load_ca(root_key)
        self._app_compose = app_compose
        self._vm_config = vm_config
        self._files = files
        self._lock = asyncio.Lock()
        self._demo_cert = ""
        self._demo_task: asyncio.Task[None] | None = None
        self._boot_events: tuple[TdxEvent, ...] | None = None
        self._kms: KmsClient | None = None
        if root_key.key_provider.kind == "Kms":
            self._kms = KmsClient(
                KmsSettings.from_root_key(root_key),
                vm_config=vm_config,
                attest=self.upstream_attestation,
                timeout=self.options.kms_timeout,
            )

    @classmethod
    def start(
        cls,
        platform: Platform,
        config: PlatformConfig,
        files: ServiceFiles,
        options: ServiceOptions | None = None,
    ) -> AgentService:
        """Configure the platform, repair the runtime log and load the app's inputs.

        Blocking; called once before serving.

        :raises ConfigurationError: any input is missing or invalid.
        :raises StateError: the runtime log cannot be reconciled with RTMR3.
        """
        platform.configure(config)
        runtime_log = RuntimeEventLog(config.runtime_log)
        if platform.info.runtime_registers:
            rtmr3 = platform.read_measurements_sync().rtmrs[3]
            outcome = runtime_log.recover(rtmr3)
            if outcome != "clean":
                log.warning("runtime event log recovered after a crash: %s", outcome)
        root_key = platform.derive_root_key_sync()
        return cls(
            platform=platform,
            runtime_log=runtime_log,
            runtime_events=runtime_log.read() if config.runtime_log.exists() else (),
            root_key=root_key,
            app_compose=_read_text(config.app_compose, "app-compose"),
            vm_config=_vm_config(_read_text(config.sys_config, "sys-config")),
            files=files,
            options=options,
        )

    @property
    def runtime_event_count(self) -> int:
        """Events in the runtime (RTMR3) log, boot events included."""
        return len(self._runtime_events)

    @property
    def app_compose(self) -> str:
        """The app-compose file's text, as read at start-up."""
        return self._app_compose

    @property
    def kms_client(self) -> KmsClient | None:
        """The KMS that issues certificates, with KMS-provisioned app keys."""
        return self._kms

    # --- keys ---

    def get_key(self, *, path: str, purpose: str, algorithm: str) -> keys.DerivedKey:
        return keys.derive_app_key(
            self._root_key.k256_key,
            self._root_key.k256_signature,
            path=path,
            purpose=purpose,
            algorithm=algorithm,
        )

    def sign(self, *, algorithm: str, data: bytes) -> keys.Signature:
        return keys.sign_with_app_key(
            self._root_key.k256_key, self._root_key.k256_signature, algorithm=algorithm, data=data
        )

    def verify(self, *, algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
        return keys.verify_signature(algorithm, data, signature, public_key)

    # --- measurements ---

    async def _snapshot(self, report_data: bytes, *, attest: bool = False) -> _Snapshot:
        """Quote (``get_quote``) or full evidence (``attest``) with the matching runtime log."""
        if attest:
            async with self._lock:
                evidence = await self.platform.attest(report_data)
                runtime = self._runtime_events
            return _Snapshot(
                quote=evidence.quote.data,
                boot_events=tuple(evidence.boot_events),
                runtime_events=runtime,
                extra=dict(evidence.extra),
            )
        if self._boot_events is None:
            self._boot_events = await self.platform.boot_event_log()
        async with self._lock:
            quote = await self.platform.get_quote(report_data)
            runtime = self._runtime_events
        return _Snapshot(
            quote=quote.data, boot_events=self._boot_events, runtime_events=runtime, extra={}
        )

    async def get_quote(self, report_data: bytes) -> QuoteResult:
        """GetQuote: a quote over the padded report data and the log that replays to it.

        Boot events carry digests only; runtime events carry digest and payload (the seed
        API's rule, so that clients can replay RTMR3 without recomputing digests).
        """
        padded = pad_report_data(report_data)
        if self.platform.info.evidence_format != "tdx":
            # upstream's shape where there is no TDX quote: the attestation instead
            return QuoteResult(
                quote=b"",
                event_log="",
                report_data=padded,
                vm_config=self._vm_config,
                attestation=await self._attestation(padded),
            )
        snap = await self._snapshot(padded)
        shown = [e.stripped() for e in snap.boot_events] + list(snap.runtime_events)
        return QuoteResult(
            quote=snap.quote,
            event_log=events_to_json(shown, include_preimage=True),
            report_data=padded,
            vm_config=self._vm_config,
        )

    async def attest(self, report_data: bytes) -> bytes:
        """Attest: the attestation over the padded report data, in the configured format."""
        return await self._attestation(pad_report_data(report_data))

    async def _attestation(self, report_data: bytes) -> bytes:
        if self.options.attestation_format == "upstream":
            return await self.upstream_attestation(report_data)
        return (await self._envelope(report_data)).to_cbor()

    async def upstream_attestation(self, report_data: bytes) -> bytes:
        """Upstream's ``VersionedAttestation`` (V0, or V1 with version-2 events) over 64 bytes
        of report data: what Attest answers upstream and what a KMS CSR carries."""
        return upstream.encode_attestation(await self._upstream(report_data))

    async def _upstream(self, report_data: bytes) -> upstream.UpstreamAttestation:
        snap = await self._snapshot(report_data, attest=True)
        return upstream.build_attestation(
            platform=self.platform.info.evidence_format,
            quote=snap.quote,
            event_log=snap.events,
            report_data=report_data,
            config=self._vm_config,
            extra=snap.extra,
        )

    async def _envelope(self, report_data: bytes) -> Envelope:
        snap = await self._snapshot(report_data, attest=True)
        return Envelope(
            platform=self.platform.info.tag,
            evidence_format=self.platform.info.evidence_format,
            quote=snap.quote,
            event_log=snap.events,
            report_data=report_data,
            vm_config=self._vm_config,
            app_info=self._app_info(snap),
            extra=snap.extra,
        )

    def _app_info(self, snap: _Snapshot) -> AppInfo:
        if self.platform.info.evidence_format != "tdx":
            return AppInfo()
        report = TdxQuote.from_bytes(snap.quote).report
        return derive_app_info(report, snap.events, self._vm_config)

    async def emit_event(self, *, event: str, payload: bytes) -> None:
        """EmitEvent: extend RTMR3 and append to the durable log under one lock.

        The write-ahead record makes a crash between the two repairable at start-up.
        """
        if not self.platform.info.runtime_registers:
            raise PlatformUnsupported(
                f"platform {self.platform.name} has no runtime measurement registers; "
                "EmitEvent is not available"
            )
        if not event:
            raise InvalidRequest("event name must not be empty", code="invalid_event")
        if len(event.encode()) > MAX_EVENT_NAME:
            raise InvalidRequest(
                f"event name is longer than {MAX_EVENT_NAME} bytes", code="invalid_event"
            )
        record = RuntimeEvent(event=event, payload=payload)
        async with self._lock:
            await asyncio.to_thread(self._log.begin, record)
            try:
                await self.platform.extend_rtmr(record.digest)
            except Exception:
                if await self._settle_failed_extend() != "committed":
                    raise
                log.warning("extend_rtmr failed after the register moved; event %r recorded", event)
            else:
                await asyncio.to_thread(self._log.commit, record)
            self._runtime_events = (*self._runtime_events, record.to_tdx_event())

    async def _settle_failed_extend(self) -> str:
        """After a failed extend, let the register decide whether the event happened.

        A kernel may fail after extending; dropping the write-ahead record then would leave
        a log that no longer replays. Recovery compares with RTMR3 and commits or discards;
        if even that fails, the record stays for start-up recovery.
        """
        try:
            rtmr3 = (await self.platform.read_measurements()).rtmrs[3]
            return await asyncio.to_thread(self._log.recover, rtmr3)
        except Exception:
            log.exception("could not settle a failed RTMR3 extension; left for start-up")
            return "unsettled"

    async def info(self) -> InfoResult:
        """Info: identity and measurements, from a fresh quote over zero report data."""
        snap = await self._snapshot(bytes(REPORT_DATA_LENGTH))
        app = self._app_info(snap)
        tcb: dict[str, object]
        if self.platform.info.evidence_format == "tdx":
            report = TdxQuote.from_bytes(snap.quote).report
            tcb = {
                "mrtd": report.mr_td.hex(),
                "rtmr0": report.rtmr0.hex(),
                "rtmr1": report.rtmr1.hex(),
                "rtmr2": report.rtmr2.hex(),
                "rtmr3": report.rtmr3.hex(),
            }
        else:
            # Upstream writes null here; the SDKs' TcbInfo models require strings.
            tcb = dict.fromkeys(("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"), "")
        tcb.update(
            mr_aggregated=app.mr_aggregated.hex(),
            os_image_hash=app.os_image_hash.hex(),
            compose_hash=app.compose_hash.hex(),
            device_id=DEVICE_ID_UNVERIFIED.hex(),
            event_log=[e.to_json() for e in snap.events],
            app_compose=self._app_compose,
        )
        return InfoResult(
            app_id=app.app_id,
            instance_id=app.instance_id,
            app_cert=await self._demo_certificate(),
            tcb_info=json.dumps(tcb, indent=2),
            app_name=_app_name(self._app_compose),
            device_id=DEVICE_ID_UNVERIFIED,
            mr_aggregated=app.mr_aggregated,
            os_image_hash=app.os_image_hash,
            key_provider_info=app.key_provider_info.decode("utf-8", "replace"),
            compose_hash=app.compose_hash,
            vm_config=self._vm_config,
            cloud_vendor=_read_dmi(self._files.dmi_dir / "sys_vendor"),
            cloud_product=_read_dmi(self._files.dmi_dir / "product_name"),
        )

    async def _demo_certificate(self) -> str:
        """Info's ``app_cert``: a demo RA-TLS chain, or ``""`` while none could be issued.

        From a KMS it is requested in the background (at start-up, see :meth:`warm_up`, and
        again while missing); Info waits at most :data:`INFO_CERT_WAIT` seconds for it, so a
        KMS outage leaves ``app_cert`` empty instead of failing Info.
        """
        if self._demo_cert or (self._ca is None and self._kms is None):
            return self._demo_cert
        if self._kms is None:
            await self._request_demo_cert()
            return self._demo_cert
        if self._demo_task is None or self._demo_task.done():
            self._demo_task = asyncio.create_task(self._request_demo_cert())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._demo_task), INFO_CERT_WAIT)
        return self._demo_cert

    async def _request_demo_cert(self) -> None:
        request = TlsKeyRequest(subject=DEMO_CERT_SUBJECT, usage_ra_tls=True, usage_client_auth=True)
        try:
            result = await self.get_tls_key(request)
        except DstackError as exc:
            if self._kms is None:
                raise
            log.warning("no app_cert for Info yet: %s", exc.message)
            return
        self._demo_cert = "\n".join(result.certificate_chain)

    def warm_up(self) -> None:
        """Start background work the first requests should not wait for (the KMS client
        certificate and Info's ``app_cert``). Call once the event loop serves."""
        if self._kms is not None and self._demo_task is None:
            self._demo_task = asyncio.create_task(self._request_demo_cert())

    async def aclose(self) -> None:
        """Release network resources (the KMS connection pool)."""
        if self._demo_task is not None:
            self._demo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._demo_task
        if self._kms is not None:
            await self._kms.close()

    # --- TLS ---

    async def get_tls_key(self, request: TlsKeyRequest) -> TlsKeyResult:
        """GetTlsKey: a fresh P-256 key and a certificate from the app CA.

        With ``usage_ra_tls`` the certificate carries our envelope, whose report data is
        ``sha512("ratls-cert:" || SPKI)``; ``with_app_info`` adds the app info extension.
        """
        return await self._issue(certs.new_tls_key(), request)

    async def _issue(self, key: ec.EllipticCurvePrivateKey, request: TlsKeyRequest) -> TlsKeyResult:
        cert_request = certs.TlsCertificateRequest(
            subject=request.subject,
            alt_names=request.alt_names,
            usage_server_auth=request.usage_server_auth,
            usage_client_auth=request.usage_client_auth,
            not_before=request.not_before,
            not_after=request.not_after,
        )  # validates the request before any quote is made
        if self._kms is not None:
            chain = await self._kms.sign(key, config_for(**attrs.asdict(request)))
            return TlsKeyResult(key=certs.private_key_pem(key), certificate_chain=chain)
        ca = self._require_ca()
        attestation = app_info = None
        if request.usage_ra_tls or request.with_app_info:
            report_data = certs.ratls_report_data(certs.spki_der(key.public_key()))
            if self.options.attestation_format == "upstream":
                attestation, app_info = upstream.certificate_extensions(
                    await self._upstream(report_data)
                )
            else:
                envelope = await self._envelope(report_data)
                attestation, app_info = envelope.to_cbor(), envelope.app_info.to_cbor()
            attestation = attestation if request.usage_ra_tls else None
            app_info = app_info if request.with_app_info else None
        cert_request = attrs.evolve(cert_request, attestation=attestation, app_info=app_info)
        cert = certs.issue_certificate(
            ca, key.public_key(), cert_request, now=datetime.now(UTC)
        )
        return TlsKeyResult(
            key=certs.private_key_pem(key),
            certificate_chain=(certs.cert_pem(cert), ca.cert_pem),
        )

    def _require_ca(self) -> certs.CertificateAuthority:
        if self._ca is None:
            raise PlatformUnsupported(
                f"the app keys (key provider {self._root_key.key_provider.name!r}) carry no "
                "CA key to issue certificates with",
                code="no_app_ca",
            )
        return self._ca

    # --- legacy Tappd ---

    async def derive_tls_key(
        self, *, path: str, random_seed: bool, request: TlsKeyRequest
    ) -> TlsKeyResult:
        """Tappd.DeriveKey: a P-256 key derived from the app key and ``path`` (or random)."""
        ikm = os.urandom(32) if random_seed else self._root_key.k256_key
        key = certs.derive_p256_key(ikm, [path.encode()])
        return await self._issue(key, attrs.evolve(request, with_app_info=False))

    async def tdx_quote(
        self, *, report_data: bytes, hash_algorithm: str, prefix: str
    ) -> tuple[QuoteResult, str, str]:
        """Tappd.TdxQuote: hash ``prefix:report_data`` (or take 64 raw bytes) and quote it.

        :returns: the quote result, the effective hash algorithm and the tag used.
        """
        algorithm = hash_algorithm or "sha512"
        tag = prefix or APP_DATA_TAG
        content = certs.report_data_for(report_data, algorithm, tag)
        result = await self.get_quote(content)
        return result, algorithm, ("" if algorithm == "raw" else tag)

    # --- misc ---

    def version(self) -> tuple[str, str]:
        return __version__, f"dstack-core/{__version__}"

    def gpu_info(self) -> str:
        try:
            return self._files.gpu_attestation.read_text()
        except (OSError, UnicodeDecodeError):
            return ""


def _load_ca(root_key: RootKey) -> certs.CertificateAuthority | None:
    provider = root_key.key_provider
    if provider.kind == "Kms" or not provider.key_pem:
        return None
    if not root_key.ca_cert_pem:
        raise ConfigurationError("appkeys has a key provider key but no ca_cert")
    return certs.CertificateAuthority.from_pem(root_key.ca_cert_pem, provider.key_pem)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {what} file {path}: {exc}") from None


def _vm_config(sys_config_text: str) -> str:
    try:
        doc = json.loads(sys_config_text)
    except ValueError as exc:
        raise ConfigurationError(f"sys-config is not JSON: {exc}") from None
    value = doc.get("vm_config", "") if isinstance(doc, dict) else None
    if not isinstance(value, str):
        raise ConfigurationError("sys-config field vm_config must be a JSON string")
    return value


def _app_name(app_compose: str) -> str:
    try:
        doc = json.loads(app_compose)
    except ValueError:
        return ""
    name = doc.get("name", "") if isinstance(doc, dict) else ""
    return name if isinstance(name, str) else ""


def _read_dmi(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""

