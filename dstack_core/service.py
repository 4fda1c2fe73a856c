"""The agent's behaviour, endpoint by endpoint, independent of HTTP.

:class:`AgentService` implements what each API method means (agent-api.md semantics) on top
of the platform façade, the durable runtime log and the pure crypto modules. The HTTP layer
only parses requests into arguments and serialises the frozen results.

Measurements: EmitEvent goes through the :class:`~dstack_core.journal.EventJournal` (group
commit, in-process repair). Quotes take no lock: each is matched to the runtime log that
replays to it by the RTMR3 it carries (:meth:`MeasuredLog.count_of`), so a quote's RTMR3
is the replay of the log returned with it at every moment, and quotes never wait for an
fsync. Serialised event logs are kept and extended (:class:`MeasuredLog`), and Info is
cached until something it shows changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from . import __version__, certs, keys
from .appinfo import DEVICE_ID_UNVERIFIED, app_info_of, os_image_hash_from_vm_config
from .config import DEFAULT_KMS_TIMEOUT
from .envelope import AppInfo, EnvelopeFields, encode_envelope, encode_envelope_hex
from .errors import (
    ConfigurationError,
    DstackError,
    EventTooLarge,
    InvalidRequest,
    PlatformError,
    PlatformUnsupported,
    ReportDataTooLong,
    StateError,
)
from .eventlog import RuntimeEvent, RuntimeEventLog
from .journal import EventJournal, EventLimits
from .jsonout import EncodedJson, escaped
from .measured import MeasuredLog
from .platform import Platform
from .quote import TD_REPORT_OFFSETS, TdReport, report_body
from .statefile import is_storage_fault
from .types import REPORT_DATA_LENGTH, RTMR_LENGTH, PlatformConfig, PlatformEvidence, RootKey

if TYPE_CHECKING:
    from . import upstream
    from .kms import KmsClient

# Upstream's attestation format and the KMS client load only when the agent is configured
# for them (``attestation_format = "upstream"``, a KMS key provider), so a plain ``serve``
# starts faster (docs/performance.md).

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
INFO_CERT_WAIT: Final = 3.0
"""Seconds Info waits for a KMS-issued ``app_cert`` before answering without it."""
_RTMR3_AT: Final = TD_REPORT_OFFSETS["rtmr3"]
_EVENT_LOG_SLOT: Final = '"event_log": []'


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


AttestationFormat = Literal["dstack-core", "upstream"]
"""What Attest, RA-TLS certificates and GetQuote's ``attestation`` carry: our CBOR envelope,
or upstream's V0/V1 ``VersionedAttestation``."""


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
    """GetQuote's answer; ``event_log`` is the JSON string, already encoded. ``attestation``
    is set (and ``quote`` empty) on platforms whose evidence is not a TDX quote, as
    upstream answers there."""

    quote: bytes
    event_log: EncodedJson
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
    """Info's answer, fields in wire order; ``tcb_info`` is the JSON string, encoded."""

    app_id: bytes
    instance_id: bytes
    app_cert: str
    tcb_info: EncodedJson
    app_name: str
    device_id: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    key_provider_info: str
    compose_hash: bytes
    vm_config: str
    cloud_vendor: str
    cloud_product: str


@attrs.frozen
class _Measured:
    """What a TD report says that does not change after boot, from one quote.

    :ivar static: the report body up to RTMR3 (MRTD, config IDs, RTMR0-2, TCB): the key.
    """

    static: bytes
    report: TdReport


class AgentService:
    """Everything the agent API does. Build with :meth:`start`; :meth:`warm_up` once a loop
    runs (it starts the committer), :meth:`aclose` at shutdown."""

    def __init__(
        self,
        *,
        platform: Platform,
        view: MeasuredLog,
        journal: EventJournal | None,
        root_key: RootKey,
        app_compose: str,
        vm_config: str,
        files: ServiceFiles,
        options: ServiceOptions | None = None,
    ) -> None:
        self.platform = platform
        self.options = options or ServiceOptions()
        self._view = view
        self._journal = journal
        self._root_key = root_key
        self._app_key = keys.AppKey(root_key.k256_key, root_key.k256_signature)
        self._ca = _load_ca(root_key)
        self._ca_pem = self._ca.cert_pem if self._ca is not None else ""
        self._app_compose = app_compose
        self._app_name = _app_name(app_compose)
        self._vm_config = vm_config
        self._os_image_hash = os_image_hash_from_vm_config(vm_config)
        self._files = files
        # Read once: the machine's DMI identity does not change while it runs.
        self._cloud = (
            _read_dmi(files.dmi_dir / "sys_vendor"), _read_dmi(files.dmi_dir / "product_name")
        )
        self._tdx = platform.info.evidence_format == "tdx"
        self._demo_cert = ""
        self._demo_task: asyncio.Task[None] | None = None
        self._kms: KmsClient | None = None
        if root_key.key_provider.kind == "Kms":
            from .kms import KmsClient, KmsSettings

            self._kms = KmsClient(
                KmsSettings.from_root_key(root_key),
                vm_config=vm_config,
                attest=self.upstream_attestation,
                timeout=self.options.kms_timeout,
            )
        self._measured: _Measured | None = None
        self._app_info: tuple[tuple[bytes, int], AppInfo] | None = None
        self._info: tuple[tuple[bytes, int, str], InfoResult] | None = None
        self._sign_keys: dict[keys.KeyAlgorithm, keys.SignKey] = {}

    @classmethod
    def start(
        cls,
        platform: Platform,
        config: PlatformConfig,
        files: ServiceFiles,
        options: ServiceOptions | None = None,
        *,
        limits: EventLimits = EventLimits(),  # noqa: B008 (frozen value)
    ) -> AgentService:
        """Configure the platform, repair the runtime log and load the app's inputs.

        Blocking; called once before serving. A repair that storage refuses (disk full,
        read-only) does not stop start-up: the committer retries it (see
        :class:`~dstack_core.journal.EventJournal`).

        :raises ConfigurationError: any input is missing or invalid.
        :raises StateError: the runtime log cannot be reconciled with RTMR3.
        """
        platform.configure(config)
        runtime_log = RuntimeEventLog(config.runtime_log)
        boot_events = platform.boot_event_log_sync()
        journal = None
        if platform.info.runtime_registers:
            rtmr3 = platform.read_measurements_sync().rtmrs[3]
            plan = runtime_log.plan_recovery(rtmr3)
            if plan.outcome != "clean":
                log.warning("runtime event log recovered after a crash: %s", plan.outcome)
            repair = plan.repair
            try:
                runtime_log.apply(plan)
                repair = None
            except OSError as exc:
                if not is_storage_fault(exc):
                    raise
                log.error("cannot repair the runtime event log %s at start-up: %s; serving, "
                          "and retrying in the background", runtime_log.path, exc)
            view = MeasuredLog(boot_events, plan.events)
            journal = EventJournal(
                platform=platform, log=runtime_log, view=view, size=plan.size, repair=repair,
                limits=limits,
            )
        else:
            view = MeasuredLog(boot_events, runtime_log.read())
        root_key = platform.derive_root_key_sync()
        return cls(
            platform=platform,
            view=view,
            journal=journal,
            root_key=root_key,
            app_compose=_read_text(config.app_compose, "app-compose"),
            vm_config=_vm_config(_read_text(config.sys_config, "sys-config")),
            files=files,
            options=options,
        )

    @property
    def runtime_event_count(self) -> int:
        """Events in the runtime (RTMR3) log, boot events included."""
        return self._journal.extended if self._journal is not None else self._view.count

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
        return self._app_key.derive(path=path, purpose=purpose, algorithm=algorithm)

    def sign(self, *, algorithm: str, data: bytes) -> keys.Signature:
        alg = keys.normalize_sign_algorithm(algorithm)
        key_alg = keys.sign_key_algorithm(alg)
        key = self._sign_keys.get(key_alg)
        if key is None:
            # Sign's key depends only on the root key (fixed for our life) and the algorithm.
            key = self._sign_keys[key_alg] = keys.SignKey.derive(
                self._root_key.k256_key, self._root_key.k256_signature, key_alg
            )
        return key.sign(alg, data)

    def verify(self, *, algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
        return keys.verify_signature(algorithm, data, signature, public_key)

    # --- measurements ---

    async def _quote(self, report_data: bytes) -> tuple[bytes, int]:
        """A quote and how many runtime events replay to its RTMR3."""
        if self._journal is None:
            return (await self.platform.get_quote(report_data)).data, self._view.count
        if not self._tdx:
            async with self._journal.extending:
                data = (await self.platform.get_quote(report_data)).data
                return data, self._journal.extended
        data = (await self.platform.get_quote(report_data)).data
        return data, self._cut(data)

    def _cut(self, quote: bytes) -> int:
        """How many runtime events replay to the RTMR3 this TDX quote carries."""
        body = report_body(quote)
        count = self._view.count_of(body[_RTMR3_AT : _RTMR3_AT + RTMR_LENGTH])
        if count is None:
            log.error("a quote carries an RTMR3 that no prefix of the runtime log replays to")
            raise StateError(
                "the quote's RTMR3 matches no prefix of the runtime event log "
                "(was RTMR3 extended outside the agent?)"
            )
        self._learn(body)
        return count

    def _learn(self, body: bytes) -> _Measured:
        """The boot-time part of a TD report body, parsed once per distinct value."""
        static = body[:_RTMR3_AT]
        if self._measured is None or self._measured.static != static:
            self._measured = _Measured(static, TdReport.from_bytes(body))
        return self._measured

    def _identity(self, count: int) -> AppInfo:
        """App info for a TD report we have seen and ``count`` runtime events (cached)."""
        assert self._measured is not None
        key = (self._measured.static, count)
        if self._app_info is None or self._app_info[0] != key:
            info = app_info_of(
                self._measured.report,
                self._view.register(count),
                self._view.identity(count),
                self._os_image_hash,
            )
            self._app_info = (key, info)
        return self._app_info[1]

    async def get_quote(self, report_data: bytes) -> QuoteResult:
        """GetQuote: a quote over the padded report data and the log that replays to it.

        Boot events carry digests only; runtime events carry digest and payload (the seed
        API's rule, so that clients can replay RTMR3 without recomputing digests).
        """
        padded = pad_report_data(report_data)
        if not self._tdx:
            # upstream's shape where there is no TDX quote: the attestation instead
            return QuoteResult(
                quote=b"",
                event_log=EncodedJson((b'""',)),
                report_data=padded,
                vm_config=self._vm_config,
                attestation=await self._attestation(padded),
            )
        quote, count = await self._quote(padded)
        return QuoteResult(
            quote=quote,
            event_log=self._view.quote_log(count),
            report_data=padded,
            vm_config=self._vm_config,
        )

    async def attest(self, report_data: bytes) -> bytes:
        """Attest: the attestation over the padded report data, in the configured format."""
        return await self._attestation(pad_report_data(report_data))

    async def attest_json(self, report_data: bytes) -> EncodedJson:
        """:meth:`attest` as the JSON string of its hex; for our envelope, assembled from the
        events' kept hex, not hex-encoded again."""
        padded = pad_report_data(report_data)
        if self.options.attestation_format == "upstream":
            return EncodedJson.hex(await self.upstream_attestation(padded))
        fields, _ = await self._evidence(padded)
        return EncodedJson.string(encode_envelope_hex(fields))

    async def _attestation(self, report_data: bytes) -> bytes:
        if self.options.attestation_format == "upstream":
            return await self.upstream_attestation(report_data)
        fields, _ = await self._evidence(report_data)
        return encode_envelope(fields)

    async def upstream_attestation(self, report_data: bytes) -> bytes:
        """Upstream's ``VersionedAttestation`` (V0, or V1 with version-2 events) over 64 bytes
        of report data: what Attest answers upstream and what a KMS CSR carries."""
        from . import upstream

        return upstream.encode_attestation(await self._upstream(report_data))

    async def _upstream(self, report_data: bytes) -> upstream.UpstreamAttestation:
        from . import upstream

        evidence, count = await self._platform_evidence(report_data)
        return upstream.build_attestation(
            platform=self.platform.info.evidence_format,
            quote=evidence.quote.data,
            event_log=self._view.events(count),
            report_data=report_data,
            config=self._vm_config,
            extra=dict(evidence.extra),
        )

    async def _platform_evidence(self, report_data: bytes) -> tuple[PlatformEvidence, int]:
        """The platform's evidence and how many runtime events replay to it."""
        if self._journal is not None and not self._tdx:
            async with self._journal.extending:
                evidence = await self.platform.attest(report_data)
                count = self._journal.extended
        else:
            evidence = await self.platform.attest(report_data)
            count = self._cut(evidence.quote.data) if self._journal else self._view.count
        boot = evidence.boot_events
        if boot is not self._view.boot_events and tuple(boot) != self._view.boot_events:
            raise PlatformError(
                f"platform hook attest returned boot events that differ from boot_event_log "
                f"of platform {self.platform.name}",
                code="platform_contract_violation",
            )
        return evidence, count

    async def _evidence(self, report_data: bytes) -> tuple[EnvelopeFields, AppInfo]:
        """The fields of an envelope over ``report_data`` and the app info among them."""
        evidence, count = await self._platform_evidence(report_data)
        app_info = AppInfo()
        if self._tdx:
            self._learn(report_body(evidence.quote.data))
            app_info = self._identity(count)
        fields = EnvelopeFields(
            platform=self.platform.info.tag,
            evidence_format=self.platform.info.evidence_format,
            quote=evidence.quote.data,
            events=self._view.envelope_events(count),
            report_data=report_data,
            vm_config=self._vm_config,
            app_info=app_info,
            extra=evidence.extra,
        )
        return fields, app_info

    async def emit_event(self, *, event: str, payload: bytes) -> None:
        """EmitEvent: measured into RTMR3 and appended to the durable log before it returns.

        :raises PlatformUnsupported: the platform has no runtime registers.
        :raises InvalidRequest: an empty or over-long name.
        :raises EventTooLarge: a payload over the limit.
        :raises EventLogFull: the log is full.
        :raises StorageError: the state directory failed (the journal says when such an
            event may still be recorded).
        """
        if self._journal is None:
            raise PlatformUnsupported(
                f"platform {self.platform.name} has no runtime measurement registers; "
                "EmitEvent is not available"
            )
        limits = self._journal.limits
        if not event:
            raise InvalidRequest("event name must not be empty", code="invalid_event")
        if len(event.encode()) > limits.name:
            raise InvalidRequest(
                f"event name is longer than {limits.name} bytes", code="invalid_event"
            )
        if len(payload) > limits.payload:
            raise EventTooLarge(f"event payload is longer than {limits.payload} bytes")
        await self._journal.emit(RuntimeEvent(event=event, payload=payload))

    async def info(self) -> InfoResult:
        """Info: identity and measurements, without a quote per call.

        MRTD, RTMR0-2 and the config IDs come from the last quote seen (one is taken over
        zero report data if none was); RTMR3 is the replay of the runtime events RTMR3
        holds. The answer is cached until either changes, or the demo certificate does.
        """
        count = self._journal.extended if self._journal is not None else self._view.count
        if self._tdx and self._measured is None:
            quote = await self.platform.get_quote(bytes(REPORT_DATA_LENGTH))
            self._learn(report_body(quote.data))
        static = self._measured.static if self._measured is not None else b""
        app_cert = await self._demo_certificate()
        key = (static, count, app_cert)
        if self._info is not None and self._info[0] == key:
            return self._info[1]
        result = self._build_info(count, app_cert)
        self._info = (key, result)
        return result

    def _build_info(self, count: int, app_cert: str) -> InfoResult:
        tcb: dict[str, object]
        if self._tdx:
            assert self._measured is not None
            report, app = self._measured.report, self._identity(count)
            tcb = {
                "mrtd": report.mr_td.hex(),
                "rtmr0": report.rtmr0.hex(),
                "rtmr1": report.rtmr1.hex(),
                "rtmr2": report.rtmr2.hex(),
                "rtmr3": self._view.register(count).hex(),
            }
        else:
            # Upstream writes null here; the SDKs' TcbInfo models require strings.
            tcb = dict.fromkeys(("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"), "")
            app = AppInfo()
        tcb.update(
            mr_aggregated=app.mr_aggregated.hex(),
            os_image_hash=app.os_image_hash.hex(),
            compose_hash=app.compose_hash.hex(),
            device_id=DEVICE_ID_UNVERIFIED.hex(),
            event_log=[],
            app_compose=self._app_compose,
        )
        head, tail = json.dumps(tcb, indent=2).split(_EVENT_LOG_SLOT)
        slot = _EVENT_LOG_SLOT[:-2]
        tcb_info = EncodedJson.string(
            [escaped(head + slot), *self._view.info_log(count), escaped(tail)]
        )
        return InfoResult(
            app_id=app.app_id,
            instance_id=app.instance_id,
            app_cert=app_cert,
            tcb_info=tcb_info,
            app_name=self._app_name,
            device_id=DEVICE_ID_UNVERIFIED,
            mr_aggregated=app.mr_aggregated,
            os_image_hash=app.os_image_hash,
            key_provider_info=app.key_provider_info.decode("utf-8", "replace"),
            compose_hash=app.compose_hash,
            vm_config=self._vm_config,
            cloud_vendor=self._cloud[0],
            cloud_product=self._cloud[1],
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
        """Start background work: the event committer (and any repair start-up left to
        it), the KMS client certificate and Info's ``app_cert``. Call once the event loop
        serves."""
        if self._journal is not None:
            self._journal.start()
        if self._kms is not None and self._demo_task is None:
            self._demo_task = asyncio.create_task(self._request_demo_cert())

    async def aclose(self) -> None:
        """Stop the committer (what it had written ahead stays for the next start) and
        release network resources (the KMS connection pool)."""
        if self._journal is not None:
            await self._journal.close()
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
            from .kms import config_for

            chain = await self._kms.sign(key, config_for(**attrs.asdict(request)))
            return TlsKeyResult(key=certs.private_key_pem(key), certificate_chain=chain)
        ca = self._require_ca()
        attestation = app_info = None
        if request.usage_ra_tls or request.with_app_info:
            report_data = certs.ratls_report_data(certs.spki_der(key.public_key()))
            if self.options.attestation_format == "upstream":
                from . import upstream

                attestation, app_info = upstream.certificate_extensions(
                    await self._upstream(report_data)
                )
            else:
                fields, info = await self._evidence(report_data)
                attestation, app_info = encode_envelope(fields), info.to_cbor()
            attestation = attestation if request.usage_ra_tls else None
            app_info = app_info if request.with_app_info else None
        cert_request = attrs.evolve(cert_request, attestation=attestation, app_info=app_info)
        cert = certs.issue_certificate(
            ca, key.public_key(), cert_request, now=datetime.now(UTC)
        )
        return TlsKeyResult(
            key=certs.private_key_pem(key),
            certificate_chain=(certs.cert_pem(cert), self._ca_pem),
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

