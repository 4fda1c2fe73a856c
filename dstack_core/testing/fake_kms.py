"""A dstack KMS for tests: ``SignCert`` as upstream's KMS does it, over real mutual TLS.

**Nothing here is secure or meant for production.** It lets an agent with KMS-provisioned
app keys run end to end without upstream's KMS (``dstack/kms/src/main_service.rs``):

* its keys are a root CA (``O=Dstack, CN=Dstack KMS CA``, P-256), the root secp256k1 key
  app keys are derived from, a temporary CA (``Dstack Client Temp CA``) whose key it hands
  out in app keys, and an RPC server certificate (usage ``kms:rpc``, SAN ``localhost`` and
  ``127.0.0.1``) issued by the root;
* :meth:`FakeKms.app_keys` gives what ``GetAppKey`` would put into ``appkeys.json`` for an
  app id (app key ``HKDF(root k256, app_id || "app-key")`` and the root's signature over it);
* it serves ``POST /prpc/SignCert`` (and ``GetMeta``) over HTTPS and **requires** a client
  certificate issued by its temporary CA; the client certificate's own attestation must
  bind its key and verify;
* ``SignCert`` decodes the SCALE CSR, checks its signature and confirm word, decodes the
  attestation and verifies it with :mod:`dstack_core.verify` (against the given trust
  bundle, simulator evidence only with ``allow_simulator``) with report data
  ``sha512("ratls-cert:" || CSR key)``; then it derives the app CA from its root key and the
  verified app id (``P-256 HKDF(root scalar, app_id || "app-ca")``, ``O=Dstack, CN=Dstack App
  CA``, path length 0, app id, usage ``app:ca``) and issues the leaf with the app id, usage
  ``app:custom``, the stripped attestation (``ext_quote``) and the msgpack app info
  (``ext_app_info``); the answer is ``[leaf, app CA, root]``;
* errors are HTTP 400 ``{"error": "..."}``, as upstream's pRPC answers them.

Tests switch its :attr:`FakeKms.behaviour` to simulate a KMS that refuses (``deny``), hangs
(``hang``), is overloaded (``unavailable``) or answers with a chain for another key
(``misissue``, a compromised or buggy KMS); :meth:`FakeKms.stop` makes it unreachable.
Run it in a background thread with :meth:`FakeKms.running`, or from the command line:
``python -m dstack_core.testing.fake_kms --trust-bundle DIR --app-id HEX --appkeys OUT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import coincurve
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import certs, der, keys, upstream
from ..collateral import Collateral
from ..errors import DstackError
from ..kms import CertSigningRequest
from ..types import KeyProvider, RootKey, TrustBundle
from ..verify import ExpectedReportData, VerificationResult, VerifyOptions, load_evidence, verify_evidence

__all__ = ["FakeKms", "KmsBehaviour"]

KmsBehaviour = Literal["sign", "deny", "hang", "unavailable", "misissue"]
APP_CA_USAGE: Final = "app:ca"
APP_CERT_USAGE: Final = "app:custom"
RPC_CERT_USAGE: Final = "kms:rpc"
APP_KEY_LABEL: Final = b"app-key"
APP_CA_LABEL: Final = b"app-ca"
APP_ID_LENGTH: Final = 20
HOST_NAMES: Final = ("localhost", "127.0.0.1")
MAX_BODY: Final = 16 * 1024 * 1024

Authorizer = Callable[[VerificationResult], str | None]
"""Given a verified attestation, a reason to refuse (``Boot denied: <reason>``) or None."""


def _name(common_name: str, org: str | None = "Dstack") -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ra_tls_extension(oid: x509.ObjectIdentifier, payload: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, der.octet_string(payload))


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    *,
    path_length: int,
    issuer: certs.CertificateAuthority | None = None,
    app_id: bytes | None = None,
    usage: str | None = None,
) -> x509.Certificate:
    """A CA certificate shaped as rcgen makes upstream's (``ca_level`` = path length)."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .serial_number(certs.serial_number_for(key.public_key()))
        .issuer_name(issuer.cert.subject if issuer else subject)
        .subject_name(subject)
        .public_key(key.public_key())
        .not_valid_before(certs.DEFAULT_NOT_BEFORE)
        .not_valid_after(now + certs.DEFAULT_VALIDITY)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    )
    if app_id is not None:
        builder = builder.add_extension(_ra_tls_extension(certs.OID_APP_ID, app_id), critical=False)
    if usage is not None:
        builder = builder.add_extension(
            _ra_tls_extension(certs.OID_CERT_USAGE, usage.encode()), critical=False
        )
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def _p256_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


class _Refused(Exception):
    """A SignCert refusal; the message goes to the client as upstream's error text."""


@attrs.define
class FakeKms:
    """A KMS whose ``SignCert`` behaves as upstream's. See the module docstring.

    :param trust: the trust bundle quotes are verified against (the simulator's or a fake
        machine's); None means Intel's root (real hardware).
    :param allow_simulator: accept simulator and external-root evidence.
    :param authorize: a policy over the verified attestation (upstream's auth API).
    :param require_client_cert: refuse TLS clients without a temporary-CA certificate.
    """

    trust: TrustBundle | None = None
    allow_simulator: bool = True
    authorize: Authorizer | None = None
    require_client_cert: bool = True
    host: str = "127.0.0.1"
    behaviour: KmsBehaviour = "sign"
    deny_reason: str = "app not allowed by the test policy"
    root: certs.CertificateAuthority = attrs.field(init=False, repr=False)
    tmp_ca: certs.CertificateAuthority = attrs.field(init=False, repr=False)
    k256_root: bytes = attrs.field(init=False, repr=False, factory=lambda: os.urandom(32))
    signed: list[x509.Certificate] = attrs.field(init=False, factory=list)
    refusals: list[str] = attrs.field(init=False, factory=list)
    client_subjects: list[str] = attrs.field(init=False, factory=list)
    port: int = attrs.field(init=False, default=0)
    _rpc_key: ec.EllipticCurvePrivateKey = attrs.field(init=False, repr=False)
    _rpc_cert: x509.Certificate = attrs.field(init=False, repr=False)
    _runner: web.AppRunner | None = attrs.field(init=False, default=None)
    _release: asyncio.Event | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        root_key = certs.new_tls_key()
        self.root = certs.CertificateAuthority(
            cert=_ca_certificate(root_key, _name("Dstack KMS CA"), path_length=1), key=root_key
        )
        tmp_key = certs.new_tls_key()
        self.tmp_ca = certs.CertificateAuthority(
            cert=_ca_certificate(tmp_key, _name("Dstack Client Temp CA"), path_length=0),
            key=tmp_key,
        )
        self._rpc_key = certs.new_tls_key()
        request = certs.TlsCertificateRequest(
            subject=HOST_NAMES[0], alt_names=HOST_NAMES, usage=RPC_CERT_USAGE,
            usage_server_auth=True,
        )
        self._rpc_cert = certs.issue_certificate(
            self.root, self._rpc_key.public_key(), request, now=datetime.now(UTC)
        )

    # --- what an operator would provision ---

    @property
    def url(self) -> str:
        """The RPC base URL an agent's ``appkeys.json`` carries (``.../prpc``)."""
        return f"https://localhost:{self.port}/prpc"

    @property
    def root_pem(self) -> str:
        return self.root.cert_pem

    def app_ca(self, app_id: bytes) -> certs.CertificateAuthority:
        """The per-app CA: key derived from the root key and the app id, signed by the root."""
        key = certs.derive_p256_key(_p256_scalar(self.root.key), [app_id, APP_CA_LABEL])
        cert = _ca_certificate(
            key, _name("Dstack App CA"), path_length=0, issuer=self.root,
            app_id=app_id, usage=APP_CA_USAGE,
        )
        return certs.CertificateAuthority(cert=cert, key=key)

    def app_keys(self, app_id: bytes, *, url: str | None = None) -> RootKey:
        """What ``GetAppKey`` returns for ``app_id``, as dstack-util writes it to appkeys.json."""
        app_key = keys.derive_key(self.k256_root, [app_id, APP_KEY_LABEL])
        app_public = coincurve.PrivateKey(app_key).public_key.format(compressed=True)
        signature = coincurve.PrivateKey(self.k256_root).sign_recoverable(
            keys.kms_message(app_id, app_public), hasher=None
        )
        return RootKey(
            k256_key=app_key,
            k256_signature=signature,
            disk_crypt_key=keys.derive_key(self.k256_root, [app_id, b"app-disk-crypt-key"]),
            env_crypt_key=keys.derive_key(self.k256_root, [app_id, b"env-encrypt-key"]),
            ca_cert_pem=self.root_pem,
            key_provider=KeyProvider(
                kind="Kms",
                name="kms",
                id=self.root.spki_der.hex(),
                url=url or self.url,
                tmp_ca_cert_pem=self.tmp_ca.cert_pem,
                tmp_ca_key_pem=certs.private_key_pem(self.tmp_ca.key),
            ),
        )

    @property
    def k256_public_key(self) -> bytes:
        return coincurve.PrivateKey(self.k256_root).public_key.format(compressed=True)

    # --- serving ---

    def _ssl_context(self, workdir: Path) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert_file, key_file = workdir / "rpc.pem", workdir / "rpc.key"
        cert_file.write_text(certs.cert_pem(self._rpc_cert))
        key_file.write_text(certs.private_key_pem(self._rpc_key))
        context.load_cert_chain(cert_file, key_file)
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=self.tmp_ca.cert_pem)
        return context

    async def start(self, port: int = 0) -> None:
        """Serve on ``host:port`` (0 picks a free port, see :attr:`port`)."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/prpc/{method}", self._dispatch)
        self._release = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listener = socket.create_server((self.host, port))
        self.port = listener.getsockname()[1]
        with tempfile.TemporaryDirectory() as workdir:
            context = self._ssl_context(Path(workdir))
        await web.SockSite(self._runner, listener, ssl_context=context).start()

    async def stop(self) -> None:
        """Stop serving: the KMS becomes unreachable (connections are refused)."""
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @contextlib.contextmanager
    def running(self, port: int = 0) -> Iterator[FakeKms]:
        """Serve from a background thread with its own event loop while the block runs."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-kms", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(port), loop).result(30)
            yield self
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()

    # --- RPC ---

    async def _dispatch(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        try:
            self._check_client(request)
            if self.behaviour == "hang" and self._release is not None:
                await self._release.wait()
            if self.behaviour == "unavailable":
                return _error(503, "KMS is overloaded, try again later")
            if method == "GetMeta":
                return _json({
                    "ca_cert": self.root_pem,
                    "allow_any_upgrade": False,
                    "k256_pubkey": self.k256_public_key.hex(),
                    "is_dev": True,
                })
            if method != "SignCert":
                return _error(400, f"Service not found: {method}")
            body = json.loads(await request.read() or b"{}")
            chain = await asyncio.to_thread(self._sign_cert, body)
            return _json({"certificate_chain": chain})
        except _Refused as exc:
            self.refusals.append(str(exc))
            return _error(400, str(exc))
        except DstackError as exc:
            self.refusals.append(exc.message)
            return _error(400, exc.message)
        except (ValueError, TypeError, KeyError) as exc:
            self.refusals.append(f"bad request: {exc}")
            return _error(400, f"Failed to decode request: {exc}")

    def _check_client(self, request: web.Request) -> None:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            if self.require_client_cert:
                raise _Refused("No client certificate")
            return
        cert = x509.load_der_x509_certificate(der)
        self.client_subjects.append(cert.subject.rfc4514_string())
        ratls = certs.RaTlsCertificate.from_certificate(cert)
        if ratls.attestation is None:
            raise _Refused("client certificate carries no attestation")
        self._verify(ratls.attestation, ratls.spki_der, stripped=True)

    def _verify(self, attestation: bytes, pubkey: bytes, *, stripped: bool) -> VerificationResult:
        collateral = Collateral.from_json(self.trust.collateral_json) if self.trust else None
        root = (
            x509.load_pem_x509_certificate(self.trust.root_ca_pem).public_bytes(
                serialization.Encoding.DER
            )
            if self.trust
            else None
        )
        try:
            result = verify_evidence(
                load_evidence(attestation),
                VerifyOptions(
                    now=int(time.time()),
                    root_ca_der=root,
                    allow_simulator=self.allow_simulator,
                    expected_report_data=ExpectedReportData.raw(certs.ratls_report_data(pubkey)),
                    allow_stripped_event_log=stripped,
                ),
                collateral,
            )
        except DstackError as exc:
            raise _Refused(f"Quote verification failed: {exc.message}") from None
        if not result.passed:
            raise _Refused(f"Quote verification failed: {result.reason}")
        return result

    def _sign_cert(self, body: dict[str, Any]) -> list[str]:
        if body.get("api_version") != 2:
            raise _Refused(f"Unsupported API version: {body.get('api_version')}")
        try:
            csr = CertSigningRequest.from_scale(bytes.fromhex(body["csr"]))
        except DstackError as exc:
            raise _Refused(f"Failed to parse csr: {exc.message}") from None
        try:
            csr.verify(bytes.fromhex(body["signature"]))
        except DstackError as exc:
            raise _Refused(f"Failed to verify csr signature: {exc.message}") from None
        result = self._verify(csr.attestation, csr.pubkey, stripped=False)
        reason = self.authorize(result) if self.authorize else None
        if self.behaviour == "deny":
            reason = self.deny_reason
        if reason is not None:
            raise _Refused(f"Boot denied: {reason}")
        if len(result.app_id) != APP_ID_LENGTH:
            raise _Refused("Boot denied: the attestation carries no app id")
        app_ca = self.app_ca(result.app_id)
        leaf = self._issue_leaf(app_ca, csr, result)
        self.signed.append(leaf)
        return [certs.cert_pem(leaf), app_ca.cert_pem, self.root_pem]

    def _issue_leaf(
        self, app_ca: certs.CertificateAuthority, csr: CertSigningRequest, result: VerificationResult
    ) -> x509.Certificate:
        config = csr.config
        attestation = app_info = None
        if config.ext_quote:
            decoded = upstream.decode_attestation(csr.attestation)
            attestation = upstream.encode_attestation(upstream.strip_for_certificate(decoded))
        if config.ext_app_info:
            app_info = upstream.encode_app_info(
                app_id=result.app_id, compose_hash=result.compose_hash,
                instance_id=result.instance_id, device_id=result.device_id,
                mr_system=result.mr_system, mr_aggregated=result.mr_aggregated,
                os_image_hash=result.os_image_hash, key_provider_info=result.key_provider_info,
                init_script_hashes=result.init_script_hashes,
            )
        key = serialization.load_der_public_key(csr.pubkey)
        assert isinstance(key, ec.EllipticCurvePublicKey)  # CertSigningRequest.verify checked
        if self.behaviour == "misissue":
            key = certs.new_tls_key().public_key()
        request = certs.TlsCertificateRequest(
            org_name=config.org_name,
            subject=config.subject,
            alt_names=config.subject_alt_names,
            usage_server_auth=config.usage_server_auth,
            usage_client_auth=config.usage_client_auth,
            not_before=config.not_before,
            not_after=config.not_after,
            attestation=attestation,
            app_info=app_info,
            usage=APP_CERT_USAGE,
            app_id=result.app_id,
        )
        try:
            return certs.issue_certificate(app_ca, key, request, now=datetime.now(UTC))
        except DstackError as exc:
            raise _Refused(f"Failed to sign certificate: {exc.message}") from None


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    # upstream's pRPC error body: pretty-printed {"error": message}
    return web.Response(
        body=json.dumps({"error": message}, indent=2).encode(), status=status,
        content_type="application/json",
    )


def _main() -> None:  # pragma: no cover - a manual tool
    parser = argparse.ArgumentParser(description="Run a fake dstack KMS (tests only).")
    parser.add_argument("--trust-bundle", type=Path, help="dir with root_ca.pem and collateral.json")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--app-id", required=True, help="hex app id to write app keys for")
    parser.add_argument("--appkeys", type=Path, required=True, help="where to write appkeys.json")
    args = parser.parse_args()
    trust = None
    if args.trust_bundle:
        trust = TrustBundle(
            root_ca_pem=(args.trust_bundle / "root_ca.pem").read_bytes(),
            collateral_json=(args.trust_bundle / "collateral.json").read_text(),
        )
    kms = FakeKms(trust=trust)
    with kms.running(args.port):
        args.appkeys.write_text(kms.app_keys(bytes.fromhex(args.app_id)).to_appkeys_json())
        print(f"fake KMS at {kms.url}; app keys in {args.appkeys}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    _main()
