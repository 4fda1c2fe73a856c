"""Certificates from a dstack KMS: upstream's CSR wire format and the ``SignCert`` client.

With KMS-provisioned app keys (``appkeys.json`` key provider ``Kms``) the app CA's key stays
in the KMS. GetTlsKey, Tappd DeriveKey and Info's ``app_cert`` then get their certificates
from the KMS's ``SignCert`` RPC, as upstream's agent does (``cert-client``,
``ra-tls/src/cert.rs``, ``kms/src/main_service.rs``):

1. the caller's P-256 key signs a SCALE ``CertSigningRequestV2``: the confirm word
   ``please sign cert:``, the key's SubjectPublicKeyInfo, a ``CertConfigV2`` and, last and
   without a length prefix, an attestation in upstream's wire format whose report data is
   ``sha512("ratls-cert:" || SPKI DER)`` (signature: ECDSA P-256 SHA-256, DER);
2. ``POST <url>/SignCert?json`` with ``{"api_version": 2, "csr", "signature", "vm_config"}``
   (hex bytes) over TLS that trusts only the KMS root from ``appkeys.json`` (``ca_cert``)
   and checks the KMS's host name, presenting a client certificate issued by the KMS's
   temporary CA (``tmp_ca_cert``/``tmp_ca_key``) that carries a quote over its own key;
3. the KMS verifies both, derives the per-app CA from its root key and the app id, and
   answers ``{"certificate_chain": [leaf, app CA, KMS root]}``.

The agent checks that the leaf certifies its key and that the chain ends at the pinned
root, and returns it unchanged. Every failure is a :class:`~dstack_core.errors.KmsError`
(HTTP 502/503, a stable code, the KMS's own message with paths removed) within a bounded
time; there is no fallback to another issuer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import certs, upstream
from .config import DEFAULT_KMS_TIMEOUT
from .errors import ConfigurationError, EvidenceError, KmsError, KmsUnavailable
from .types import RootKey

__all__ = [
    "CSR_CONFIRM",
    "DEFAULT_KMS_TIMEOUT",
    "SIGN_CERT_API_VERSION",
    "CertConfig",
    "CertSigningRequest",
    "KmsClient",
    "KmsSettings",
    "config_for",
    "sanitize_remote_message",
]

log = logging.getLogger(__name__)

CSR_CONFIRM: Final = "please sign cert:"
SIGN_CERT_API_VERSION: Final = 2
SIGN_CERT_METHOD: Final = "SignCert"
KMS_CONNECT_TIMEOUT: Final = 5.0
"""Seconds to establish the TCP connection (upstream's reqwest connect timeout)."""
MAX_KMS_RESPONSE: Final = 1024 * 1024
MAX_REMOTE_MESSAGE: Final = 512
TEMP_CERT_SUBJECT: Final = "RA-TLS TEMP Cert"
_U64: Final = 8
_OPTION_NONE: Final = 0
_OPTION_SOME: Final = 1

# An absolute path in a remote message: "/" not preceded by a word character, ":" or "/"
# (so URLs such as https://kms/prpc survive), then path segments.
_PATH_RE: Final = re.compile(r"(?<![\w:/.])/(?:[\w.@+-]+/)*[\w.@+-]+/?")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]+")


def sanitize_remote_message(text: str) -> str:
    """A message from another service, safe to put in our response body: control
    characters folded to spaces, absolute file paths replaced by ``<path>``, at most
    :data:`MAX_REMOTE_MESSAGE` characters."""
    text = _CONTROL_RE.sub(" ", text)
    text = _PATH_RE.sub("<path>", text)
    text = " ".join(text.split())
    if len(text) > MAX_REMOTE_MESSAGE:
        text = text[: MAX_REMOTE_MESSAGE - 3] + "..."
    return text


# --- the CSR (pure) --------------------------------------------------------------------


def _scale_option_str(value: str | None) -> bytes:
    return b"\x00" if value is None else b"\x01" + upstream.scale_str(value)


def _scale_option_u64(value: int | None) -> bytes:
    return b"\x00" if value is None else b"\x01" + value.to_bytes(_U64, "little")


def _str_tuple(value: Sequence[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class CertConfig:
    """Upstream's ``CertConfigV2``: what the leaf should say.

    :ivar ext_quote: embed the (stripped) attestation (GetTlsKey's ``usage_ra_tls``).
    :ivar ext_app_info: embed the app info (GetTlsKey's ``with_app_info``).
    :ivar not_before: unix seconds or None; likewise ``not_after``.
    """

    org_name: str | None = None
    subject: str = ""
    subject_alt_names: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    ext_quote: bool = False
    ext_app_info: bool = False
    not_before: int | None = None
    not_after: int | None = None

    def to_scale(self) -> bytes:
        """SCALE, fields in declaration order (``Option`` = ``00`` or ``01`` + value)."""
        return (
            _scale_option_str(self.org_name)
            + upstream.scale_str(self.subject)
            + upstream.scale_compact(len(self.subject_alt_names))
            + b"".join(upstream.scale_str(n) for n in self.subject_alt_names)
            + upstream.scale_bool(self.usage_server_auth)
            + upstream.scale_bool(self.usage_client_auth)
            + upstream.scale_bool(self.ext_quote)
            + upstream.scale_bool(self.ext_app_info)
            + _scale_option_u64(self.not_before)
            + _scale_option_u64(self.not_after)
        )


@attrs.frozen(kw_only=True)
class CertSigningRequest:
    """Upstream's ``CertSigningRequestV2``.

    :ivar pubkey: the DER SubjectPublicKeyInfo of the key to certify.
    :ivar attestation: upstream ``VersionedAttestation`` wire bytes (V0 or V1).
    :ivar confirm: must be :data:`CSR_CONFIRM` for a KMS to sign.
    """

    pubkey: bytes
    config: CertConfig
    attestation: bytes
    confirm: str = CSR_CONFIRM

    def to_scale(self) -> bytes:
        """The signed bytes: confirm, pubkey, config, then the attestation (no prefix)."""
        return (
            upstream.scale_str(self.confirm)
            + upstream.scale_bytes(self.pubkey)
            + self.config.to_scale()
            + self.attestation
        )

    def sign(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        """ECDSA P-256 SHA-256 over :meth:`to_scale`, DER (ring's ``ECDSA_P256_SHA256_ASN1``)."""
        return key.sign(self.to_scale(), ec.ECDSA(hashes.SHA256()))

    def verify(self, signature: bytes) -> None:
        """Check the signature with :attr:`pubkey` and the confirm word, as a KMS does.

        :raises EvidenceError: not a P-256 key, a signature that does not verify, or a
            confirm word other than :data:`CSR_CONFIRM`.
        """
        try:
            key = serialization.load_der_public_key(self.pubkey)
        except (ValueError, TypeError) as exc:
            raise EvidenceError(f"CSR public key is not valid DER: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise EvidenceError("CSR public key is not a P-256 key")
        try:
            key.verify(signature, self.to_scale(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise EvidenceError("CSR signature does not verify") from None
        if self.confirm != CSR_CONFIRM:
            raise EvidenceError("CSR confirm word is wrong")

    @classmethod
    def from_scale(cls, data: bytes) -> CertSigningRequest:
        """Decode the SCALE bytes; the attestation is all that follows the config.

        :raises EvidenceError: truncation, invalid UTF-8, a bad bool or option tag, or no
            attestation bytes.
        """
        reader = upstream._ScaleReader(bytes(data), label="CSR")
        confirm = reader.string("confirm")
        pubkey = reader.vec_u8("pubkey")
        org_name = reader.string("org_name") if _option(reader, "org_name") else None
        subject = reader.string("subject")
        names = tuple(
            reader.string(f"subject_alt_names[{i}]")
            for i in range(reader.count("subject_alt_names", 1))
        )
        flags = [_bool(reader, name) for name in (
            "usage_server_auth", "usage_client_auth", "ext_quote", "ext_app_info"
        )]
        bounds = [
            int.from_bytes(reader.take(_U64, name), "little") if _option(reader, name) else None
            for name in ("not_before", "not_after")
        ]
        attestation = reader.take(reader.remaining, "attestation")
        if not attestation:
            raise EvidenceError("CSR carries no attestation")
        return cls(
            confirm=confirm,
            pubkey=pubkey,
            config=CertConfig(
                org_name=org_name,
                subject=subject,
                subject_alt_names=names,
                usage_server_auth=flags[0],
                usage_client_auth=flags[1],
                ext_quote=flags[2],
                ext_app_info=flags[3],
                not_before=bounds[0],
                not_after=bounds[1],
            ),
            attestation=attestation,
        )


def _bool(reader: Any, what: str) -> bool:
    value: int = reader.u8(what)
    if value not in (0, 1):
        raise EvidenceError(f"CSR {what} is not a SCALE bool")
    return bool(value)


def _option(reader: Any, what: str) -> bool:
    tag: int = reader.u8(what)
    if tag not in (_OPTION_NONE, _OPTION_SOME):
        raise EvidenceError(f"CSR {what} has an invalid Option tag {tag}")
    return tag == _OPTION_SOME


# --- the client ------------------------------------------------------------------------

Attester = Callable[[bytes], Awaitable[bytes]]
"""Given 64 bytes of report data, this guest's attestation in upstream's wire format."""

Observer = Callable[[str, float], None]
"""Told the outcome code (``ok`` or an error code) and the seconds of every SignCert call."""


def _pem_chain(text: str, what: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise ConfigurationError(f"{what} is not a PEM certificate") from None
    return chain


@attrs.frozen(kw_only=True)
class KmsSettings:
    """Where the KMS is and whom to trust, from ``appkeys.json``.

    :ivar url: the RPC base URL (``https://<host>:<port>/prpc``).
    :ivar root_pem: the KMS root CA (``ca_cert``): the only TLS trust anchor, and the
        certificate every returned chain must end with.
    :ivar tmp_ca: the temporary CA that issues the agent's client certificate.
    """

    url: str
    root_pem: str = attrs.field(repr=False)
    tmp_ca: certs.CertificateAuthority = attrs.field(repr=False)

    @classmethod
    def from_root_key(cls, root_key: RootKey) -> KmsSettings:
        """:raises ConfigurationError: a missing or malformed field of the ``Kms`` provider."""
        provider = root_key.key_provider
        if provider.kind != "Kms":
            raise ConfigurationError("the app keys are not KMS-provisioned")
        parts = urlsplit(provider.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigurationError(
                f"appkeys.json: the KMS url must be an https:// URL, got {provider.url!r}"
            )
        if not root_key.ca_cert_pem:
            raise ConfigurationError("appkeys.json: KMS-provisioned keys need ca_cert")
        if len(_pem_chain(root_key.ca_cert_pem, "appkeys.json ca_cert")) != 1:
            raise ConfigurationError("appkeys.json: ca_cert must hold exactly one certificate")
        if not provider.tmp_ca_cert_pem or not provider.tmp_ca_key_pem:
            raise ConfigurationError("appkeys.json: the Kms provider needs tmp_ca_cert and tmp_ca_key")
        return cls(
            url=provider.url.rstrip("/"),
            root_pem=root_key.ca_cert_pem,
            tmp_ca=certs.CertificateAuthority.from_pem(
                provider.tmp_ca_cert_pem, provider.tmp_ca_key_pem
            ),
        )

    @property
    def endpoint(self) -> str:
        """``host:port`` of the KMS, for messages (never the path)."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 443}"


def _memfd_pem(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding ``data``: private keys never touch a disk."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def _client_ssl_context(settings: KmsSettings, cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """TLS that trusts only the KMS root, checks the host name and presents our cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=settings.root_pem)
    cert_fd = _memfd_pem("kms-client-cert", cert_pem.encode())
    key_fd = _memfd_pem("kms-client-key", key_pem.encode())
    try:
        context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
    finally:
        os.close(cert_fd)
        os.close(key_fd)
    return context


class KmsClient:
    """Issues certificates through a KMS's ``SignCert``; one per agent.

    The client certificate (a fresh key with a quote over it, issued by the temporary CA)
    is made on first use and kept for the agent's lifetime, as upstream does; the HTTPS
    connection pool lives as long. Call :meth:`close` at shutdown.

    :param attest: makes this guest's upstream-format attestation for given report data.
    :param timeout: seconds for one SignCert exchange (:data:`DEFAULT_KMS_TIMEOUT`).
    :param observe: called with the outcome code and duration of every SignCert call.
    """

    def __init__(
        self,
        settings: KmsSettings,
        *,
        vm_config: str,
        attest: Attester,
        timeout: float = DEFAULT_KMS_TIMEOUT,
        observe: Observer | None = None,
    ) -> None:
        self.settings = settings
        self._vm_config = vm_config
        self._attest = attest
        self._timeout = timeout
        self.observe = observe
        self._root = _pem_chain(settings.root_pem, "ca_cert")[0]
        self._session: aiohttp.ClientSession | None = None
        self._session_lock = asyncio.Lock()

    async def sign(
        self, key: ec.EllipticCurvePrivateKey, config: CertConfig
    ) -> tuple[str, ...]:
        """The KMS's certificate chain for ``key``: ``(leaf, app CA, KMS root)`` PEMs.

        :raises KmsError: the KMS is unreachable, slow, untrusted or refuses, or its answer
            does not certify ``key`` under the pinned root.
        """
        spki = certs.spki_der(key.public_key())
        attestation = await self._attest(certs.ratls_report_data(spki))
        csr = CertSigningRequest(pubkey=spki, config=config, attestation=attestation)
        body = {
            "api_version": SIGN_CERT_API_VERSION,
            "csr": csr.to_scale().hex(),
            "signature": csr.sign(key).hex(),
            "vm_config": self._vm_config,
        }
        started = time.monotonic()
        outcome = "ok"
        try:
            answer = await self._call(SIGN_CERT_METHOD, body)
            return self._check_chain(answer, spki)
        except KmsError as exc:
            outcome = exc.code
            raise
        finally:
            if self.observe is not None:
                self.observe(outcome, time.monotonic() - started)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- plumbing ---

    async def _client_session(self) -> aiohttp.ClientSession:
        async with self._session_lock:
            if self._session is None:
                cert_pem, key_pem = await self._client_certificate()
                context = _client_ssl_context(self.settings, cert_pem, key_pem)
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=context),
                    timeout=aiohttp.ClientTimeout(
                        total=self._timeout, connect=min(KMS_CONNECT_TIMEOUT, self._timeout)
                    ),
                )
            return self._session

    async def _client_certificate(self) -> tuple[str, str]:
        """``generate_ra_cert``: a fresh key, a quote over it, the temporary CA's signature."""
        key = certs.new_tls_key()
        spki = certs.spki_der(key.public_key())
        attestation = upstream.decode_attestation(
            await self._attest(certs.ratls_report_data(spki))
        )
        request = certs.TlsCertificateRequest(
            subject=TEMP_CERT_SUBJECT,
            attestation=upstream.encode_attestation(upstream.strip_for_certificate(attestation)),
            usage=None,
        )
        cert = certs.issue_certificate(
            self.settings.tmp_ca, key.public_key(), request, now=datetime.now(UTC)
        )
        return certs.cert_pem(cert), certs.private_key_pem(key)

    async def _call(self, method: str, body: dict[str, Any]) -> Any:
        where = self.settings.endpoint
        url = f"{self.settings.url}/{method}?json"
        session = await self._client_session()
        try:
            async with session.post(
                url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            ) as response:
                raw = await response.content.read(MAX_KMS_RESPONSE + 1)
                status = response.status
        except aiohttp.ClientConnectorCertificateError as exc:
            reason = getattr(exc.certificate_error, "verify_message", "") or "not trusted"
            raise KmsError(
                f"the KMS at {where} presented a certificate that is not issued by the KMS root "
                f"in appkeys.json ({sanitize_remote_message(str(reason))})",
                code="kms_untrusted",
            ) from None
        except aiohttp.ClientSSLError:
            raise KmsError(
                f"TLS handshake with the KMS at {where} failed (did it refuse our client "
                "certificate?)",
                code="kms_tls_error",
            ) from None
        except (TimeoutError, asyncio.TimeoutError):
            raise KmsUnavailable(
                f"the KMS at {where} did not answer within {self._timeout:g} seconds",
                code="kms_timeout",
            ) from None
        except (aiohttp.ClientError, OSError):
            raise KmsUnavailable(f"cannot reach the KMS at {where}") from None
        if len(raw) > MAX_KMS_RESPONSE:
            raise KmsError(f"the KMS at {where} sent an over-long answer", code="kms_bad_response")
        if status != 200:
            message = _remote_error(raw)
            text = f"the KMS at {where} refused {method} (HTTP {status})"
            text += f": {message}" if message else ""
            if status >= 500:
                raise KmsUnavailable(text)
            raise KmsError(text, code="kms_rejected")
        try:
            return json.loads(raw)
        except ValueError:
            raise KmsError(
                f"the KMS at {where} answered {method} with invalid JSON", code="kms_bad_response"
            ) from None

    def _check_chain(self, answer: Any, spki: bytes) -> tuple[str, ...]:
        def bad(why: str) -> KmsError:
            return KmsError(
                f"the KMS at {self.settings.endpoint} returned an unusable certificate chain: {why}",
                code="kms_bad_response",
            )

        chain = answer.get("certificate_chain") if isinstance(answer, dict) else None
        if not isinstance(chain, list) or len(chain) < 2 or not all(
            isinstance(p, str) for p in chain
        ):
            raise bad("certificate_chain must be a list of at least two PEM strings")
        try:
            parsed = [x509.load_pem_x509_certificate(p.encode()) for p in chain]
        except ValueError:
            raise bad("a certificate is not PEM") from None
        if certs.spki_der(parsed[0].public_key()) != spki:
            raise bad("the leaf does not certify the requested key")
        try:
            certs.verify_chain(parsed)
        except EvidenceError as exc:
            raise bad(exc.message) from None
        if parsed[-1] != self._root:
            raise bad("it does not end with the KMS root from appkeys.json")
        return tuple(chain)


def _remote_error(raw: bytes) -> str:
    """The ``error`` text of a pRPC error body (``{"error": "..."}``), sanitised."""
    try:
        doc = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace")
    else:
        text = doc.get("error", "") if isinstance(doc, dict) else ""
        text = text if isinstance(text, str) else json.dumps(text)
    return sanitize_remote_message(text)


def config_for(
    *,
    subject: str,
    alt_names: Sequence[str],
    usage_server_auth: bool,
    usage_client_auth: bool,
    usage_ra_tls: bool,
    with_app_info: bool,
    not_before: int | None,
    not_after: int | None,
) -> CertConfig:
    """GetTlsKey's arguments as upstream maps them into ``CertConfigV2`` (no org name)."""
    return CertConfig(
        subject=subject,
        subject_alt_names=alt_names,
        usage_server_auth=usage_server_auth,
        usage_client_auth=usage_client_auth,
        ext_quote=usage_ra_tls,
        ext_app_info=with_app_info,
        not_before=not_before,
        not_after=not_after,
    )
