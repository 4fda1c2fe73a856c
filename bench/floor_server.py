#!/usr/bin/env python3
"""The "floor": the baseline server plus exactly the cryptography each endpoint needs
(not a correct agent: no spec'd formats, fake keys).

    python3 floor_server.py SOCKET_PATH [--uvloop]

Copied unchanged in substance from the project's reference benchmark harness (shared
bench/, "selftest/floor_server.py"); see bench/README.md.

Measuring it against baseline_server.py with compare.py checks the additive
floor model (HTTP ceiling + in-process crypto) that README.md quotes.
"""
import asyncio
import json
import os
import signal
import sys

import cbor2
import coincurve
import nacl.signing
from aiohttp import web
from Crypto.Hash import keccak
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
import datetime
import hashlib

APP_KEY = coincurve.PrivateKey(bytes([7] * 32))
IKM = bytes(range(32))
VMS_ED = nacl.signing.SigningKey(bytes([9] * 32))   # "vms" key cached at startup
CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA_NAME = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Dstack"),
                     x509.NameAttribute(NameOID.COMMON_NAME, "Dstack App CA")])
QUOTE = os.urandom(5000)
APPINFO = os.urandom(600)
NB = datetime.datetime(1975, 1, 1, tzinfo=datetime.timezone.utc)
NA = datetime.datetime(2035, 1, 1, tzinfo=datetime.timezone.utc)
ENVELOPE = {"version": 1, "platform": "tdx", "quote": QUOTE, "report_data": bytes(64),
            "event_log": [{"imr": i % 4, "event_type": 0x08000001, "digest": os.urandom(48),
                           "event": f"event-{i}", "event_payload": os.urandom(32)}
                          for i in range(40)], "vm_config": "x" * 300}
EVLOG = json.dumps([{"imr": 3, "event_type": 134217729, "digest": "ab" * 48, "event": f"e{i}",
                     "event_payload": "cd" * 16} for i in range(14)])
LOG_FD = os.open(f"/tmp/floor_server_{os.getpid()}.log",
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def resp(obj):
    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode(),
                        content_type="application/json")


def derive(path: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"RATLS", info=path).derive(IKM)


async def get_key(req):
    b = json.loads(await req.read())
    k = derive(b.get("path", "").encode())
    if b.get("algorithm") == "ed25519":
        pub = nacl.signing.SigningKey(k).verify_key.encode()
    else:
        pub = coincurve.PublicKey.from_secret(k).format(compressed=True)
    msg = f"{b.get('purpose', '')}:{pub.hex()}".encode()
    sig = APP_KEY.sign_recoverable(keccak.new(digest_bits=256, data=msg).digest(), hasher=None)
    return resp({"key": k.hex(), "signature_chain": [sig.hex(), ""]})


async def sign(req):
    b = json.loads(await req.read())
    sig = VMS_ED.sign(bytes.fromhex(b["data"])).signature
    return resp({"signature": sig.hex(), "signature_chain": [sig.hex(), "ab" * 65, ""],
                 "public_key": VMS_ED.verify_key.encode().hex()})


async def verify(req):
    b = json.loads(await req.read())
    vk = nacl.signing.VerifyKey(bytes.fromhex(b["public_key"]))
    try:
        vk.verify(bytes.fromhex(b["data"]), bytes.fromhex(b["signature"]))
        ok = True
    except Exception:
        ok = False
    return resp({"valid": ok})


async def info(req):
    await req.read()
    return resp({"app_id": "ab" * 20, "tcb_info": EVLOG, "quote_hex": QUOTE[:2000].hex()})


async def get_quote(req):
    b = json.loads(await req.read())
    rd = bytes.fromhex(b.get("report_data", "")).ljust(64, b"\0")
    return resp({"quote": QUOTE.hex(), "event_log": EVLOG, "report_data": rd.hex(),
                 "vm_config": "{}"})


async def attest(req):
    b = json.loads(await req.read())
    env = dict(ENVELOPE, report_data=bytes.fromhex(b.get("report_data", "")).ljust(64, b"\0"))
    return resp({"attestation": cbor2.dumps(env).hex()})


async def get_tls_key(req):
    b = json.loads(await req.read())
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    spki = pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    rd = hashlib.sha512(b"ratls-cert:" + spki).digest()
    att = cbor2.dumps(dict(ENVELOPE, report_data=rd))
    key.sign(att[:200], ec.ECDSA(hashes.SHA256()))   # CSR self-signature
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, b.get("subject", ""))]))
            .issuer_name(CA_NAME).public_key(pub).serial_number(0x1234567890ABCDEF)
            .not_valid_before(NB).not_valid_after(NA)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in b.get("alt_names", [])]), False)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                         False, False), True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.9"), APPINFO), False)
            .add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.4"), b"\x04\x0aapp:custom"), False)
            .add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.8"), att[:5000]), False)
            .sign(CA_KEY, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return resp({"key": pem, "certificate_chain": [
        cert.public_bytes(serialization.Encoding.PEM).decode()]})


async def emit_event(req):
    b = json.loads(await req.read())
    payload = bytes.fromhex(b.get("payload", ""))
    hashlib.sha384(b"\x01\x00\x00\x08:" + b.get("event", "").encode() + b":" + payload).digest()
    os.write(LOG_FD, json.dumps({"event": b.get("event"), "payload": b.get("payload")}).encode()
             + b"\n")
    return resp(None)


async def version(req):
    await req.read()
    return resp({"version": "0.5.11", "rev": "bench"})


async def run(sock):
    app = web.Application()
    for p, h in (("GetKey", get_key), ("Sign", sign), ("Verify", verify), ("Info", info),
                 ("GetQuote", get_quote), ("GetTlsKey", get_tls_key), ("Attest", attest),
                 ("EmitEvent", emit_event), ("Version", version)):
        app.router.add_post("/" + p, h)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        os.unlink(sock)
    except FileNotFoundError:
        pass
    await web.UnixSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    sock = [a for a in sys.argv[1:] if not a.startswith("--")][0]
    try:
        if "--uvloop" in sys.argv:
            import uvloop
            uvloop.run(run(sock))
        else:
            asyncio.run(run(sock))
    finally:
        os.close(LOG_FD)
        os.unlink(f"/tmp/floor_server_{os.getpid()}.log")
