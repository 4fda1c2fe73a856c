"""Bad input on every endpoint, against a real agent subprocess, over raw HTTP.

Every error is ``{"error", "code"}`` ASCII JSON with a Content-Length and a stable snake_case
code; caller mistakes are 400, unknown paths 404, platform failures 5xx, and the daemon keeps
serving (and logs no traceback) after the whole barrage. :class:`TestStillServing` runs last.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
import threading
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from dstack_core import errors, keys
from dstack_core.server.app import DEFAULT_MAX_BODY, create_app
from dstack_core.testing import AgentProcess, uds_request
from dstack_core.testing.abuse import MALFORMED_REQUESTS, read_answer, send_raw
from dstack_core.types import RootKey

CODE = re.compile(r"[a-z]+(_[a-z]+)*")
HEX = re.compile(r"[0-9a-f]*")
ZERO_64 = "00" * 64
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

# The wire schema of every method that takes arguments, written out independently of app.py.
FIELDS: dict[str, dict[str, str]] = {
    "/GetTlsKey": {
        "subject": "str",
        "alt_names": "str_list",
        "usage_ra_tls": "bool",
        "usage_server_auth": "bool",
        "usage_client_auth": "bool",
        "not_before": "u64",
        "not_after": "u64",
        "with_app_info": "bool",
    },
    "/GetKey": {"path": "str", "purpose": "str", "algorithm": "str"},
    "/GetQuote": {"report_data": "bytes"},
    "/Attest": {"report_data": "bytes"},
    "/EmitEvent": {"event": "str", "payload": "bytes"},
    "/Sign": {"algorithm": "str", "data": "bytes"},
    "/Verify": {"algorithm": "str", "data": "bytes", "signature": "bytes", "public_key": "bytes"},
    "/prpc/Tappd.DeriveKey": {
        "path": "str",
        "subject": "str",
        "alt_names": "str_list",
        "usage_ra_tls": "bool",
        "usage_server_auth": "bool",
        "usage_client_auth": "bool",
        "random_seed": "bool",
    },
    "/prpc/Tappd.DeriveK256Key": {"path": "str", "purpose": "str", "algorithm": "str"},
    "/prpc/Tappd.TdxQuote": {"report_data": "bytes", "hash_algorithm": "str", "prefix": "str"},
    "/prpc/Tappd.RawQuote": {"report_data": "bytes"},
}
WRONG_TYPES: dict[str, list[Any]] = {
    "str": [1, 1.5, True, None, ["a"], {"a": "b"}],
    "bytes": [1, True, None, ["00"], {"a": "00"}],
    "bool": ["true", "1", 1, 0, None, [True]],
    "u64": [-1, 2**64, 10**30, 1.5, 1e3, "1", True, [1], {"n": 1}],
    "str_list": ["a", None, [1], [None], [["a"]], {"0": "a"}],
}
BAD_HEX = ["abc", "zz", "0xZZ", "0X00", "0x0", "é0", "00 "]
NO_ARGS = ["/Info", "/Version", "/GpuInfo", "/prpc/Tappd.Info", "/prpc/Tappd.Version"]


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    agent: AgentProcess, method: str, path: str, body: bytes | None = None, **kw: Any
) -> Reply:
    return Reply(*uds_request(agent.socket, method, path, body, **kw))


def post(agent: AgentProcess, path: str, args: Any) -> Reply:
    return send(agent, "POST", path, json.dumps(args).encode())


def send_large(
    agent: AgentProcess, path: str, body: bytes, *, chunked: bool = False, verb: str = "POST"
) -> Reply:
    """Send a body the server may stop reading part way; the reply is still read."""
    head = f"{verb} {path} HTTP/1.1\r\nHost: dstack\r\nConnection: close\r\n"
    head += "Content-Type: application/json\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        step = 1 << 20
        payload = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step])
                for i in range(0, len(body), step)
            )
            + b"0\r\n\r\n"
        )
    else:
        head += f"Content-Length: {len(body)}\r\n\r\n"
        payload = body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(agent.socket))
        try:
            sock.sendall(head.encode() + payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    top, _, content = raw.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return Reply(int(status_line.split()[1]), headers, content)


def assert_json_response(reply: Reply) -> Any:
    """Any answer: ASCII JSON with an exact Content-Length."""
    assert reply.headers["content-type"].split(";")[0] == "application/json"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert reply.body.isascii()
    return reply.json()


def assert_error(reply: Reply, status: int, code: str, fragment: str = "") -> str:
    """An error answer: the status, exactly {error, code}, the given stable code."""
    assert reply.status == status, reply.body
    doc = assert_json_response(reply)
    assert set(doc) == {"error", "code"}
    assert isinstance(doc["error"], str) and doc["error"]
    assert isinstance(doc["code"], str) and CODE.fullmatch(doc["code"])
    assert doc["code"] == code, doc
    assert fragment in doc["error"]
    return doc["error"]


def assert_hex(value: str) -> bytes:
    """Output hex is lowercase, without 0x."""
    assert isinstance(value, str) and HEX.fullmatch(value), value
    return bytes.fromhex(value)


def ok(reply: Reply) -> Any:
    assert reply.status == 200, reply.body
    return assert_json_response(reply)


def signed(agent: AgentProcess, algorithm: str, data: bytes = b"message") -> dict[str, str]:
    """A valid Verify request for ``data`` signed by the agent."""
    sig = ok(post(agent, "/Sign", {"algorithm": algorithm, "data": data.hex()}))
    return {
        "algorithm": algorithm,
        "data": data.hex(),
        "signature": sig["signature"],
        "public_key": sig["public_key"],
    }


def expected_key(agent: AgentProcess, path: str, purpose: str) -> keys.DerivedKey:
    root = RootKey.from_appkeys_json((agent.state_dir / "appkeys.json").read_bytes())
    return keys.derive_app_key(
        root.k256_key, root.k256_signature, path=path, purpose=purpose, algorithm=""
    )


def leaf(reply: Reply) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ok(reply)["certificate_chain"][0].encode())


def _cases(kinds: dict[str, list[Any]]) -> list[Any]:
    return [
        pytest.param(path, field, value, id=f"{path}-{field}-{json.dumps(value)}")
        for path, fields in FIELDS.items()
        for field, kind in fields.items()
        for value in kinds.get(kind, [])
    ]


class TestFieldTypes:
    @pytest.mark.parametrize(("path", "field", "value"), _cases(WRONG_TYPES))
    def test_wrong_json_type(self, agent, path, field, value):
        """Each field of each method rejects every wrong JSON type with 400 naming the field."""
        assert_error(post(agent, path, {field: value}), 400, "invalid_request", field)

    @pytest.mark.parametrize(("path", "field", "value"), _cases({"bytes": BAD_HEX}))
    def test_bad_hex(self, agent, path, field, value):
        """Each bytes field rejects odd length or non-hex characters with invalid_hex."""
        assert_error(post(agent, path, {field: value}), 400, "invalid_hex", field)

    @pytest.mark.parametrize(
        ("path", "field", "value"),
        [
            ("/GetKey", "path", "\ud800"),
            ("/GetKey", "purpose", "a\udfffb"),
            ("/EmitEvent", "event", "\ud800"),
            ("/GetTlsKey", "subject", "\ud800"),
            ("/GetTlsKey", "alt_names", ["ok.example", "\ud800"]),
            ("/prpc/Tappd.DeriveKey", "path", "\ud800"),
            ("/prpc/Tappd.TdxQuote", "prefix", "\ud800"),
        ],
    )
    def test_lone_surrogate(self, agent, path, field, value):
        """A JSON \\ud800 escape (not valid Unicode) is a 400, not a crash."""
        assert_error(post(agent, path, {field: value}), 400, "invalid_request", "Unicode")

    @pytest.mark.parametrize("field", ["not_before", "not_after"])
    def test_null_u64_is_unset(self, agent, field):
        """The optional u64 validity bounds accept null as "not set"."""
        ok(post(agent, "/GetTlsKey", {field: None}))


BIG = b'{"pad": "' + b"0" * (11 << 20) + b'"}'


class TestBodies:
    @pytest.mark.parametrize(
        ("body", "code", "fragment"),
        [
            pytest.param(b"hello", "invalid_json", "not valid JSON", id="text"),
            pytest.param(b"path=a&purpose=b", "invalid_json", "not valid JSON", id="form"),
            pytest.param(b'{"path": "a"', "invalid_json", "not valid JSON", id="truncated"),
            pytest.param(b'{"a": 1} {"a": 2}', "invalid_json", "not valid JSON", id="trailing"),
            pytest.param(b'["a", "b"]', "invalid_json", "JSON object", id="array"),
            pytest.param(b'"a"', "invalid_json", "JSON object", id="string"),
            pytest.param(b"42", "invalid_json", "JSON object", id="number"),
            pytest.param(b"null", "invalid_json", "JSON object", id="null"),
            pytest.param(b"true", "invalid_json", "JSON object", id="bool"),
            pytest.param(b'{"x": 1, "x": 1}', "invalid_json", "duplicate", id="duplicate"),
            pytest.param(b'{"x": "\xff"}', "invalid_json", "UTF-8", id="bad-utf8"),
            pytest.param(b"\xef\xbb\xbf{}", "invalid_json", "BOM", id="bom"),
            pytest.param(b"[" * 100_000, "invalid_json", "deeply", id="deep-array"),
            pytest.param(b'{"x":' * 100_000, "invalid_json", "deeply", id="deep-object"),
            pytest.param(b'{"x": NaN}', "invalid_json", "NaN", id="nan"),
            pytest.param(b'{"x": ' + b"9" * 5000 + b"}", "invalid_json", "integer", id="bigint"),
        ],
    )
    @pytest.mark.parametrize("path", FIELDS)
    def test_malformed_body(self, agent, path, body, code, fragment):
        """Every method with arguments rejects malformed or non-object JSON bodies with 400."""
        assert_error(send(agent, "POST", path, body), 400, code, fragment)

    @pytest.mark.parametrize("path", [*FIELDS, *NO_ARGS])
    def test_body_over_limit(self, agent, path):
        """An 11 MiB body is 400 payload_too_large on every method, also those without
        arguments (the default limit is 10 MiB)."""
        assert_error(send_large(agent, path, BIG), 400, "payload_too_large", "payload too large")

    @pytest.mark.parametrize("path", ["/Info", "/Version", "/GpuInfo", "/GetKey"])
    def test_body_over_limit_on_get(self, agent, path):
        """A GET with an 11 MiB body is refused too: the limit does not depend on the verb."""
        assert_error(send_large(agent, path, BIG, verb="GET"), 400, "payload_too_large")

    def test_chunked_body_over_limit(self, agent):
        """A chunked body is held to the same limit."""
        reply = send_large(agent, "/GetKey", BIG, chunked=True)
        assert_error(reply, 400, "payload_too_large")

    def test_limit_is_inclusive(self, agent):
        """A body of exactly 10 MiB is read and parsed; one byte more is refused."""
        pad = DEFAULT_MAX_BODY - len(b'{"path": "a", "pad": ""}')
        body = b'{"path": "a", "pad": "' + b"0" * pad + b'"}'
        assert ok(send_large(agent, "/GetKey", body)) == ok(post(agent, "/GetKey", {"path": "a"}))
        assert_error(send_large(agent, "/GetKey", body + b" "), 400, "payload_too_large")

    @pytest.mark.parametrize("body", [None, b"", b"  \n", b"{}"])
    @pytest.mark.parametrize("path", FIELDS)
    def test_empty_body_means_defaults(self, agent, path, body):
        """No body, an empty or blank body and {} all mean "every field defaults"."""
        reply = send(agent, "POST", path, body)
        assert reply.status in (200, 400)
        assert reply.status == send(agent, "POST", path, b"{}").status

    @pytest.mark.parametrize("path", NO_ARGS)
    def test_no_argument_methods_ignore_the_body(self, agent, path):
        """Info, Version and GpuInfo ignore any body and query, as upstream's Empty input does."""
        ok(send(agent, "POST", path, b"[[[ not json"))
        ok(send(agent, "GET", path + "?report_data=zz&x"))


class TestSemantics:
    @pytest.mark.parametrize(
        ("path", "args", "code", "fragment"),
        [
            (
                "/GetQuote",
                {"report_data": "00" * 65},
                "report_data_too_long",
                "Report data is too long",
            ),
            (
                "/Attest",
                {"report_data": "00" * 65},
                "report_data_too_long",
                "Report data is too long",
            ),
            (
                "/prpc/Tappd.RawQuote",
                {"report_data": "00" * 65},
                "invalid_request",
                "invalid content length",
            ),
            (
                "/prpc/Tappd.RawQuote",
                {"report_data": "00" * 63},
                "invalid_request",
                "invalid content length",
            ),
            ("/prpc/Tappd.RawQuote", {}, "invalid_request", "invalid content length"),
            (
                "/prpc/Tappd.TdxQuote",
                {"report_data": "00" * 65, "hash_algorithm": "raw"},
                "invalid_request",
                "invalid content length",
            ),
            (
                "/prpc/Tappd.TdxQuote",
                {"hash_algorithm": "md5"},
                "unsupported_algorithm",
                "invalid hash algorithm",
            ),
            (
                "/prpc/Tappd.TdxQuote",
                {"hash_algorithm": "SHA512"},
                "unsupported_algorithm",
                "invalid hash algorithm",
            ),
            ("/GetKey", {"algorithm": "rsa"}, "unsupported_algorithm", "Unsupported algorithm"),
            ("/GetKey", {"algorithm": "Ed25519"}, "unsupported_algorithm", "Unsupported algorithm"),
            (
                "/GetKey",
                {"algorithm": "secp256k1_prehashed"},
                "unsupported_algorithm",
                "Unsupported algorithm",
            ),
            (
                "/prpc/Tappd.DeriveK256Key",
                {"algorithm": "rsa"},
                "unsupported_algorithm",
                "Unsupported algorithm",
            ),
            (
                "/Sign",
                {"algorithm": "", "data": "00"},
                "unsupported_algorithm",
                "Unsupported algorithm",
            ),
            ("/Sign", {"data": "00"}, "unsupported_algorithm", "Unsupported algorithm"),
            ("/Sign", {"algorithm": "rsa"}, "unsupported_algorithm", "Unsupported algorithm"),
            (
                "/Sign",
                {"algorithm": "secp256k1_prehashed", "data": "00" * 31},
                "invalid_digest_length",
                "received 31 bytes",
            ),
            (
                "/Sign",
                {"algorithm": "secp256k1_prehashed", "data": "00" * 33},
                "invalid_digest_length",
                "received 33 bytes",
            ),
            ("/Verify", {"algorithm": "foo"}, "unsupported_algorithm", "Unsupported algorithm"),
            ("/Verify", {}, "unsupported_algorithm", "Unsupported algorithm"),
            (
                "/GetTlsKey",
                {"not_before": 100, "not_after": 100},
                "invalid_request",
                "not_before must be earlier than not_after",
            ),
            (
                "/GetTlsKey",
                {"not_before": 200, "not_after": 100},
                "invalid_request",
                "not_before must be earlier than not_after",
            ),
            ("/GetTlsKey", {"not_before": 253402300800}, "invalid_request", "out of range"),
            (
                "/GetTlsKey",
                {"alt_names": ["ok.example", "bücher.example"]},
                "invalid_request",
                "alt name",
            ),
            (
                "/prpc/Tappd.DeriveKey",
                {"alt_names": ["日本.example"]},
                "invalid_request",
                "alt name",
            ),
            ("/EmitEvent", {"event": "", "payload": "00"}, "invalid_event", "empty"),
            ("/EmitEvent", {}, "invalid_event", "empty"),
            ("/EmitEvent", {"event": "x" * 257}, "invalid_event", "longer"),
            ("/EmitEvent", {"event": "é" * 129}, "invalid_event", "longer"),
        ],
    )
    def test_rejected(self, agent, path, args, code, fragment):
        """Well-typed but unacceptable arguments are 400 with the catalogue message and code."""
        assert_error(post(agent, path, args), 400, code, fragment)

    @pytest.mark.parametrize("algorithm", ["secp256k1", "k256", "secp256k1_prehashed", "ed25519"])
    def test_wrong_signature_is_valid_false(self, agent, algorithm):
        """A well-formed signature over other data is 200 {"valid": false}, not an error."""
        data = bytes(range(32))
        request = signed(agent, algorithm, data)
        assert ok(post(agent, "/Verify", request)) == {"valid": True}
        other = dict(request, data=bytes(range(1, 33)).hex())
        assert ok(post(agent, "/Verify", other)) == {"valid": False}

    @pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519"])
    @pytest.mark.parametrize(
        ("field", "mutate", "code"),
        [
            ("public_key", lambda b: b[:-1], "invalid_public_key"),
            ("public_key", lambda b: b + b"\x00", "invalid_public_key"),
            ("public_key", lambda b: b"", "invalid_public_key"),
            ("signature", lambda b: b[:-1], "invalid_signature"),
            ("signature", lambda b: b + b"\x01", "invalid_signature"),
            ("signature", lambda b: b"", "invalid_signature"),
        ],
        ids=["pk-short", "pk-long", "pk-empty", "sig-short", "sig-long", "sig-empty"],
    )
    def test_malformed_key_or_signature(self, agent, algorithm, field, mutate, code):
        """A public key or signature of the wrong length is 400, never valid:false."""
        request = signed(agent, algorithm)
        request[field] = mutate(bytes.fromhex(request[field])).hex()
        assert_error(post(agent, "/Verify", request), 400, code)

    @pytest.mark.parametrize(
        "public_key", ["00" * 33, "04" + "00" * 64, "02" + "ff" * 32, "05" + "11" * 32]
    )
    def test_secp256k1_public_key_not_a_point(self, agent, public_key):
        """A secp256k1 key of the right length that is not a curve point is 400."""
        request = dict(signed(agent, "secp256k1"), public_key=public_key)
        assert_error(post(agent, "/Verify", request), 400, "invalid_public_key")

    @pytest.mark.parametrize(
        ("r", "s"),
        [(0, 1), (1, 0), (SECP256K1_N, 1), (1, SECP256K1_N)],
        ids=["r0", "s0", "rn", "sn"],
    )
    def test_secp256k1_scalar_out_of_range(self, agent, r, s):
        """r or s outside [1, n) is a malformed signature (400)."""
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        request = dict(signed(agent, "secp256k1"), signature=signature.hex())
        assert_error(post(agent, "/Verify", request), 400, "invalid_signature")

    def test_ed25519_public_key_not_a_point(self, agent):
        """An ed25519 key that does not decompress (y = 2) is 400 invalid_public_key."""
        request = dict(signed(agent, "ed25519"), public_key=(b"\x02" + bytes(31)).hex())
        assert_error(post(agent, "/Verify", request), 400, "invalid_public_key")

    def test_secp256k1_hybrid_public_key(self, agent):
        """A SEC1 'hybrid' encoding (tag 06/07) is not a valid key upstream: 400."""
        request = signed(agent, "secp256k1")
        pub = keys.coincurve.PublicKey(bytes.fromhex(request["public_key"])).format(
            compressed=False
        )
        hybrid = bytes([6 + (pub[-1] & 1)]) + pub[1:]
        assert_error(
            post(agent, "/Verify", dict(request, public_key=hybrid.hex())),
            400,
            "invalid_public_key",
        )

    def test_emit_event_answers_empty_object(self, agent):
        """A valid EmitEvent answers exactly {} (upstream says null; the SDKs accept both)."""
        reply = post(agent, "/EmitEvent", {"event": "test-errors", "payload": "0xABCD"})
        assert ok(reply) == {} and reply.body == b"{}"


class TestHex:
    def test_prefix_and_upper_case_accepted(self, agent):
        """0x-prefixed, upper-case hex is the same input as plain lowercase hex."""
        plain = ok(post(agent, "/GetQuote", {"report_data": "abcdef"}))
        fancy = ok(post(agent, "/GetQuote", {"report_data": "0xABCDEF"}))
        assert plain["report_data"] == fancy["report_data"] == "abcdef" + "00" * 61

    def test_repeated_prefix_stripped(self, agent):
        """Like upstream's trim_start_matches("0x"), every leading 0x is stripped."""
        assert (
            ok(post(agent, "/GetQuote", {"report_data": "0x0x01"}))["report_data"]
            == "01" + "00" * 63
        )

    @pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519"])
    def test_sign_and_verify_take_any_case(self, agent, algorithm):
        """Sign gives the same signature for any spelling; Verify takes 0x/upper-case inputs."""
        lower = ok(post(agent, "/Sign", {"algorithm": algorithm, "data": "deadbeef"}))
        upper = ok(post(agent, "/Sign", {"algorithm": algorithm, "data": "0xDEADBEEF"}))
        assert lower == upper
        shout = {
            "algorithm": algorithm,
            "data": "0xDEADBEEF",
            "signature": "0x" + lower["signature"].upper(),
            "public_key": "0x" + lower["public_key"].upper(),
        }
        assert ok(post(agent, "/Verify", shout)) == {"valid": True}

    @pytest.mark.parametrize(
        ("path", "args", "fields"),
        [
            ("/GetKey", {"path": "a"}, ["key", "signature_chain"]),
            ("/GetQuote", {"report_data": "0xFF"}, ["quote", "report_data"]),
            ("/Attest", {"report_data": "0xFF"}, ["attestation"]),
            (
                "/Sign",
                {"algorithm": "secp256k1", "data": "0xFF"},
                ["signature", "signature_chain", "public_key"],
            ),
            ("/prpc/Tappd.DeriveK256Key", {"path": "a"}, ["k256_key", "k256_signature_chain"]),
            ("/prpc/Tappd.TdxQuote", {"report_data": "0xFF"}, ["quote"]),
            ("/prpc/Tappd.RawQuote", {"report_data": "AB" * 64}, ["quote"]),
        ],
    )
    def test_output_is_lowercase_without_prefix(self, agent, path, args, fields):
        """Every bytes field in a response is lowercase hex without 0x."""
        doc = ok(post(agent, path, args))
        for name in fields:
            for value in doc[name] if isinstance(doc[name], list) else [doc[name]]:
                assert_hex(value)


class TestCompatibility:
    def test_missing_fields_default(self, agent):
        """{} equals every field given its default, for GetKey and GetQuote."""
        assert ok(post(agent, "/GetKey", {})) == ok(
            post(agent, "/GetKey", {"path": "", "purpose": "", "algorithm": ""})
        )
        assert ok(post(agent, "/GetQuote", {}))["report_data"] == ZERO_64

    def test_unknown_fields_ignored(self, agent):
        """Unknown or differently spelled keys are ignored, whatever their type."""
        base = ok(post(agent, "/GetKey", {"path": "a", "purpose": "b"}))
        noisy = {"path": "a", "purpose": "b", "Path": 1, "extra": {"x": [None, 1.5]}, "json": True}
        assert ok(post(agent, "/GetKey", noisy)) == base
        quote = ok(post(agent, "/GetQuote", {"reportData": "zz"}))
        assert quote["report_data"] == ZERO_64

    def test_content_type_not_required(self, agent):
        """The body is JSON whatever the Content-Type says."""
        body = json.dumps({"path": "a"}).encode()
        reply = send(agent, "POST", "/GetKey", body, headers={"Content-Type": "text/plain"})
        assert ok(reply) == ok(post(agent, "/GetKey", {"path": "a"}))


class TestQueryForms:
    def test_get_key(self, agent):
        """GET /GetKey?path=a&purpose=b equals the POST and the locally derived key."""
        got = ok(send(agent, "GET", "/GetKey?path=a&purpose=b"))
        assert got == ok(post(agent, "/GetKey", {"path": "a", "purpose": "b"}))
        assert bytes.fromhex(got["key"]) == expected_key(agent, "a", "b").secret

    @pytest.mark.parametrize(
        "query",
        [
            "alt_names[0]=x.example&alt_names[1]=10.0.0.1",
            "alt_names[1]=10.0.0.1&alt_names[0]=x.example",
            "alt_names[]=x.example&alt_names[]=10.0.0.1",
            "alt_names%5B%5D=x.example&alt_names%5B%5D=10.0.0.1",
        ],
    )
    def test_alt_names(self, agent, query):
        """Indexed and empty-bracket list forms give the SANs in order (IP literals as IPs)."""
        cert = leaf(send(agent, "GET", f"/GetTlsKey?subject=s&{query}"))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(n.value) for n in san] == ["x.example", "10.0.0.1"]
        assert isinstance(list(san)[1], x509.IPAddress)

    @pytest.mark.parametrize(
        ("text", "on"), [("true", True), ("1", True), ("false", False), ("0", False)]
    )
    def test_booleans(self, agent, text, on):
        """Booleans in a query are true/false/1/0."""
        cert = leaf(send(agent, "GET", f"/GetTlsKey?usage_server_auth={text}"))
        try:
            eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            eku = []
        assert (ExtendedKeyUsageOID.SERVER_AUTH in eku) is on

    def test_validity(self, agent):
        """not_before/not_after are decimal integers in a query."""
        cert = leaf(send(agent, "GET", "/GetTlsKey?not_before=1700000000&not_after=1800000000"))
        assert cert.not_valid_before_utc == datetime.fromtimestamp(1700000000, UTC)
        assert cert.not_valid_after_utc == datetime.fromtimestamp(1800000000, UTC)

    @pytest.mark.parametrize(
        "path",
        [
            "/GetQuote?report_data=0xABCD",
            "/prpc/GetQuote?report_data=abcd",
            "/prpc/Tappd.TdxQuote?report_data=" + "AB" * 10 + "&hash_algorithm=sha256&prefix=p",
            "/prpc/Tappd.RawQuote?report_data=" + "AB" * 64,
            "/Attest?report_data=0x01",
            "/Sign?algorithm=ed25519&data=0xAB",
            "/EmitEvent?event=query-event&payload=0xAB",
            "/prpc/Tappd.DeriveKey?path=p&subject=s&random_seed=1",
            "/prpc/Tappd.DeriveK256Key?path=p&purpose=q",
        ],
    )
    def test_every_method_takes_a_query(self, agent, path):
        """GET with a query string works for every method with arguments."""
        ok(send(agent, "GET", path))

    def test_tdx_quote_query_fields(self, agent):
        """TdxQuote reads hash_algorithm and prefix from the query."""
        doc = ok(
            send(agent, "GET", "/prpc/Tappd.TdxQuote?report_data=00&hash_algorithm=sha256&prefix=p")
        )
        assert (doc["hash_algorithm"], doc["prefix"]) == ("sha256", "p")

    def test_verify_via_query(self, agent):
        """A Verify round trip works entirely through query strings."""
        sig = ok(send(agent, "GET", "/Sign?algorithm=ed25519&data=0xAB"))
        query = (
            f"algorithm=ed25519&data=AB&signature={sig['signature']}&public_key={sig['public_key']}"
        )
        assert ok(send(agent, "GET", f"/Verify?{query}")) == {"valid": True}

    @pytest.mark.parametrize(
        ("path", "code", "fragment"),
        [
            ("/GetTlsKey?usage_ra_tls=yes", "invalid_request", "usage_ra_tls"),
            ("/GetTlsKey?with_app_info=", "invalid_request", "with_app_info"),
            ("/GetTlsKey?not_before=-1", "invalid_request", "not_before"),
            ("/GetTlsKey?not_before=1.5", "invalid_request", "not_before"),
            ("/GetTlsKey?not_before=%C2%B2", "invalid_request", "not_before"),
            ("/GetTlsKey?not_after=" + "9" * 30, "invalid_request", "out of range"),
            ("/GetTlsKey?not_after=18446744073709551616", "invalid_request", "out of range"),
            ("/GetTlsKey?alt_names[" + "9" * 40 + "]=a", "invalid_request", "alt_names"),
            ("/GetTlsKey?alt_names[]=b%C3%BCcher.example", "invalid_request", "alt name"),
            (
                "/GetTlsKey?not_before=5&not_after=5",
                "invalid_request",
                "not_before must be earlier",
            ),
            ("/GetKey?path=a&path=b", "invalid_request", "duplicate"),
            ("/GetKey?algorithm=rsa", "unsupported_algorithm", "Unsupported algorithm"),
            ("/GetQuote?report_data=zz", "invalid_hex", "report_data"),
            ("/GetQuote?report_data=abc", "invalid_hex", "report_data"),
            ("/GetQuote?report_data=" + "00" * 65, "report_data_too_long", "too long"),
            ("/prpc/Tappd.RawQuote?report_data=00", "invalid_request", "invalid content length"),
            ("/prpc/Tappd.TdxQuote?hash_algorithm=md5", "unsupported_algorithm", "hash algorithm"),
            ("/prpc/Tappd.DeriveKey?random_seed=maybe", "invalid_request", "random_seed"),
            (
                "/Sign?algorithm=secp256k1_prehashed&data=00",
                "invalid_digest_length",
                "received 1 bytes",
            ),
            ("/EmitEvent?event=", "invalid_event", "empty"),
        ],
    )
    def test_bad_query(self, agent, path, code, fragment):
        """Bad query values get the same 400 errors as bad JSON."""
        assert_error(send(agent, "GET", path), 400, code, fragment)


class TestRouting:
    @pytest.mark.parametrize(
        ("prefix", "name"),
        [
            ("/", "GetKey"),
            ("/prpc/", "GetKey"),
            ("/prpc/", "DeriveK256Key"),
            ("/prpc/Tappd.", "DeriveK256Key"),
            ("/prpc/Tappd.Tappd.", "DeriveK256Key"),
        ],
    )
    def test_method_prefixes(self, agent, prefix, name):
        """Methods answer at /<M>, /prpc/<M> and /prpc/Tappd.<M> (Tappd. repeated is stripped)."""
        doc = ok(post(agent, f"{prefix}{name}", {"path": "a", "purpose": "b"}))
        assert (
            doc.get("key", doc.get("k256_key"))
            == ok(post(agent, "/GetKey", {"path": "a", "purpose": "b"}))["key"]
        )

    @pytest.mark.parametrize(
        "path", ["/Version", "/prpc/Version", "/prpc/Tappd.Version", "/Get%4Bey"]
    )
    def test_known_paths(self, agent, path):
        """No-argument methods at every prefix, and percent-encoded names, are served."""
        ok(send(agent, "GET", path))

    @pytest.mark.parametrize(
        "path",
        [
            "/Nope",
            "/getkey",
            "/GETKEY",
            "/DstackGuest.GetKey",
            "/Tappd.Info",
            "/DeriveKey",
            "/RawQuote",
            "/prpc",
            "/prpc/Nope",
            "/prpc/Tappd.Nope",
            "/prpc/Tappd.GetKey",
            "/prpc/Tappd.EmitEvent",
            "/prpc/Tappd.",
            "/prpc/Worker.Info",
            "/%E2%82%AC",
        ],
    )
    @pytest.mark.parametrize("verb", ["GET", "POST"])
    def test_unknown_method(self, agent, verb, path):
        """Unknown method names under every prefix are a JSON 404 naming the method."""
        assert_error(
            send(agent, verb, path, b"{}" if verb == "POST" else None),
            404,
            "not_found",
            "Service not found",
        )

    @pytest.mark.parametrize(
        "path",
        [
            "/",
            "/GetKey/",
            "/GetKey/extra",
            "/prpc/",
            "/prpc/GetKey/extra",
            "/prpc/Tappd.Info/x",
            "/a/b/c",
            "//GetKey",
            "/prpc//GetKey",
        ],
    )
    def test_extra_segments(self, agent, path):
        """A path that is not exactly one method segment (after an optional /prpc) is a JSON 404."""
        assert_error(send(agent, "GET", path), 404, "not_found")

    @pytest.mark.parametrize("verb", ["PUT", "DELETE", "PATCH", "OPTIONS"])
    @pytest.mark.parametrize("path", ["/GetKey", "/Info", "/prpc/Tappd.DeriveKey"])
    def test_other_http_methods(self, agent, verb, path):
        """Verbs other than GET/HEAD/POST are a JSON 405 with an Allow header."""
        reply = send(agent, verb, path, b"{}")
        assert_error(reply, 405, "method_not_allowed")
        assert {"GET", "HEAD", "POST"} <= {v.strip() for v in reply.headers["allow"].split(",")}

    @pytest.mark.parametrize("path", ["/Version", "/prpc/Tappd.Version", "/GetKey?path=a"])
    def test_head(self, agent, path):
        """HEAD answers as GET does (Rocket's rule), with the headers and no body."""
        head, get = send(agent, "HEAD", path), send(agent, "GET", path)
        assert head.status == 200 and head.body == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        assert int(head.headers["content-length"]) == len(get.body)

    def test_head_unknown(self, agent):
        """HEAD on an unknown method is a 404 without a body."""
        reply = send(agent, "HEAD", "/Nope")
        assert reply.status == 404 and reply.body == b""
        assert reply.headers["content-type"] == "application/json"


class TestResponses:
    @pytest.mark.parametrize(
        ("verb", "path", "body"),
        [
            ("GET", "/Version", None),
            ("POST", "/Info", b"{}"),
            ("GET", "/GpuInfo", None),
            ("POST", "/GetKey", b'{"path": "\\u00e9\\u20ac"}'),
            ("POST", "/GetTlsKey", '{"subject": "Zürich"}'.encode()),
            ("GET", "/prpc/Tappd.Info", None),
        ],
    )
    def test_success_is_ascii_json_with_length(self, agent, verb, path, body):
        """Successful answers are ASCII JSON objects with an exact Content-Length."""
        assert isinstance(ok(send(agent, verb, path, body)), dict)

    def test_non_ascii_echo_is_escaped(self, agent):
        """A non-ASCII method name echoed in an error is \\u-escaped, keeping the body ASCII."""
        message = assert_error(send(agent, "GET", "/%C3%A9t%C3%A9"), 404, "not_found")
        assert message == "Service not found: été"

    def test_error_codes_are_snake_case(self):
        """Every DstackError subclass carries a snake_case code and an HTTP status."""
        for name in errors.__all__:
            cls = getattr(errors, name)
            assert CODE.fullmatch(cls.code), name
            assert 400 <= cls.http_status < 600


class _FailingService:
    """A stand-in service whose GetKey raises the given exception."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def get_key(self, **_: Any) -> Any:
        raise self.exc


def _in_process(
    exc: BaseException, *, max_body: int = DEFAULT_MAX_BODY, body: bytes = b"{}"
) -> Reply:
    async def run() -> Reply:
        app = create_app(_FailingService(exc), max_body=max_body)  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/GetKey", data=body)
            return Reply(
                resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()
            )

    return asyncio.run(run())


class TestErrorMiddleware:
    @pytest.mark.parametrize(
        ("exc", "status", "code"),
        [
            (errors.PlatformError("TDX quote failed"), 500, "platform_error"),
            (errors.PlatformUnsupported("no RTMRs"), 501, "platform_unsupported"),
            (errors.PlatformBusy("busy"), 503, "platform_busy"),
            (errors.StateError("log diverged"), 500, "state_error"),
            (errors.InvalidRequest("custom", code="my_code"), 400, "my_code"),
        ],
    )
    def test_dstack_errors(self, exc, status, code):
        """A DstackError becomes its status and code with its message."""
        assert assert_error(_in_process(exc), status, code) == exc.message

    def test_unexpected_exception_hides_internals(self, caplog):
        """Any other exception is a bare 500 that leaks nothing; the traceback goes to the log."""
        reply = _in_process(RuntimeError("secret /etc/key"))
        assert assert_error(reply, 500, "internal_error") == "internal error"
        assert b"secret" not in reply.body
        assert any(r.exc_info for r in caplog.records)

    def test_configured_limit(self):
        """create_app(max_body=N) refuses larger bodies with payload_too_large."""
        reply = _in_process(RuntimeError("unreached"), max_body=64, body=b"{" + b" " * 64 + b"}")
        assert_error(reply, 400, "payload_too_large")


GZIP_KEY_REQUEST = {"path": "gz", "purpose": "encoding"}


def raw_reply(agent: AgentProcess, data: bytes) -> Reply:
    return Reply(*read_answer(send_raw(agent.socket, data)))


class TestHttpLayer:
    """What aiohttp's parser rejects before any handler runs is our JSON error too."""

    @pytest.mark.parametrize("case", MALFORMED_REQUESTS, ids=lambda c: c.name)
    def test_malformed_request(self, agent, case):
        """Each malformed request gets its status and stable code as {error, code} JSON."""
        reply = raw_reply(agent, case.request)
        assert_error(reply, case.status, case.code)
        if case.status == 405:
            assert reply.headers["allow"] == "GET, HEAD, POST"

    def test_nothing_is_echoed(self, agent):
        """Parser errors do not echo the client's bytes (header names, values, the line)."""
        reply = raw_reply(agent, b"GET /Version HTTP/1.1\r\nHost: x\r\nSecret Header: v\r\n\r\n")
        assert_error(reply, 400, "malformed_http")
        assert b"Secret" not in reply.body

    def test_expect_100_continue(self, agent):
        """Expect: 100-continue gets the interim answer, then the request is served."""
        body = json.dumps(GZIP_KEY_REQUEST).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(agent.socket))
            sock.sendall(b"POST /GetKey HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        assert ok(Reply(*read_answer(raw))) == ok(post(agent, "/GetKey", GZIP_KEY_REQUEST))


def _gzip_members(data: bytes) -> bytes:
    half = len(data) // 2
    return gzip.compress(data[:half]) + gzip.compress(data[half:])


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


class TestContentEncoding:
    @pytest.mark.parametrize(
        ("coding", "encode"),
        [
            ("gzip", gzip.compress),
            ("x-gzip", gzip.compress),
            ("GZIP", gzip.compress),
            ("deflate", zlib.compress),
            ("deflate", _raw_deflate),
            ("identity", lambda b: b),
            ("gzip, identity", gzip.compress),
            ("gzip", _gzip_members),
        ],
        ids=["gzip", "x-gzip", "upper-case", "zlib", "raw-deflate", "identity", "list",
             "gzip-members"],
    )
    def test_supported_codings(self, agent, coding, encode):
        """gzip and deflate bodies decode to the same request as the plain body."""
        plain = json.dumps(GZIP_KEY_REQUEST).encode()
        reply = send(agent, "POST", "/GetKey", encode(plain), headers={"Content-Encoding": coding})
        assert ok(reply) == ok(post(agent, "/GetKey", GZIP_KEY_REQUEST))

    def test_decoded_size_is_limited(self, agent):
        """A gzip bomb (11 MiB of JSON in a small body) is payload_too_large, not a blow-up."""
        bomb = gzip.compress(BIG)
        assert len(bomb) < 100_000
        reply = send(agent, "POST", "/GetKey", bomb, headers={"Content-Encoding": "gzip"})
        assert_error(reply, 400, "payload_too_large")

    @pytest.mark.parametrize("path", ["/Info", "/Version", "/GpuInfo"])
    def test_encoding_checked_on_methods_without_arguments(self, agent, path):
        """Methods that ignore their body still refuse an unknown coding (415)."""
        reply = send(agent, "POST", path, b"{}", headers={"Content-Encoding": "br"})
        assert_error(reply, 415, "unsupported_content_encoding")

    def test_garbage_gzip_logs_no_traceback(self, fresh_agent):
        """gzip that is not gzip is a 400 and leaves no traceback (it was a 500 with two)."""
        fresh_agent.start()
        reply = send(fresh_agent, "POST", "/GetKey", b'{"path": "x"}',
                     headers={"Content-Encoding": "gzip"})
        assert_error(reply, 400, "invalid_content_encoding")
        ok(send(fresh_agent, "GET", "/Version"))
        assert fresh_agent.stop() == 0
        assert "Traceback" not in fresh_agent.output()


class TestStillServing:
    def test_concurrent_barrage(self, agent):
        """Bad and good requests from many threads at once: every good one is answered."""
        failures: list[str] = []
        good = ok(post(agent, "/GetKey", {"path": "c"}))

        def worker(n: int) -> None:
            for i in range(20):
                bad = send(agent, "POST", "/GetKey", [b"[" * 50_000, b"{", b'{"path": 1}'][i % 3])
                if bad.status != 400:
                    failures.append(f"bad request got {bad.status}")
                if (
                    reply := post(agent, "/GetKey", {"path": "c"})
                ).status != 200 or reply.json() != good:
                    failures.append(f"good request got {reply.status}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []

    def test_http_garbage(self, agent):
        """Bytes that are not HTTP are refused by the server without disturbing it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(agent.socket))
            sock.sendall(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
            answer = sock.recv(65536)
        # The parser refuses it before any middleware runs; the answer is still our JSON.
        assert_error(Reply(*read_answer(answer)), 400, "malformed_http")
        ok(send(agent, "GET", "/Version"))

    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"POST /GetKey HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
            b'POST /GetKey HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"pat',
            b"GET /GetQuote HTTP/1.1\r\nHost: x\r\n\r\n",
        ],
        ids=["content-length", "chunked", "no-wait"],
    )
    def test_client_hangs_up(self, agent, request_bytes):
        """A client that disconnects mid-request is not an error of ours (no traceback)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(agent.socket))
            sock.sendall(request_bytes)
            time.sleep(0.1)
        ok(send(agent, "GET", "/Version"))

    def test_daemon_still_answers(self, agent):
        """After everything above, the same agent process answers GetKey and Info normally."""
        assert agent.proc is not None and agent.proc.poll() is None
        doc = ok(post(agent, "/GetKey", {"path": "after", "purpose": "barrage"}))
        expected = expected_key(agent, "after", "barrage")
        assert assert_hex(doc["key"]) == expected.secret
        assert [assert_hex(s) for s in doc["signature_chain"]] == list(expected.signature_chain)
        info = ok(send(agent, "GET", "/Info"))
        assert info["app_id"] and info["tcb_info"]

    def test_no_traceback_logged(self, agent):
        """No request in this module made the agent log a traceback or an unexpected error."""
        output = agent.output()
        assert "Traceback" not in output
        assert "unexpected error" not in output


class TestMalformedHttp:
    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"POST /GetKey HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"POST /GetKey HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
        ],
        ids=["no-host", "bad-chunk-size"],
    )
    def test_malformed_framing_logs_no_traceback(self, fresh_agent, request_bytes):
        """Malformed HTTP framing from a local client is a 400, not a logged traceback."""
        fresh_agent.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(fresh_agent.socket))
            sock.sendall(request_bytes)
            assert_error(Reply(*read_answer(sock.recv(65536))), 400, "malformed_http")
        ok(send(fresh_agent, "GET", "/Version"))
        assert "Traceback" not in fresh_agent.output()

    @pytest.mark.parametrize(
        ("head", "rest"),
        [
            (b"Transfer-Encoding: chunked\r\n\r\n", b"ZZ\r\n"),
            (b"Transfer-Encoding: chunked\r\n\r\n", b"2\r\n{}XX"),
        ],
        ids=["bad-chunk-size", "bad-chunk-end"],
    )
    def test_framing_error_inside_the_body(self, fresh_agent, head, rest):
        """Broken framing that arrives after the head (the handler is reading the body) is
        one JSON 400 that closes the connection, and no traceback."""
        fresh_agent.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(fresh_agent.socket))
            sock.sendall(b"POST /GetKey HTTP/1.1\r\nHost: x\r\n" + head)
            time.sleep(0.2)
            sock.sendall(rest)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        reply = Reply(*read_answer(raw))
        assert_error(reply, 400, "malformed_http")
        assert raw.count(b"HTTP/1.1 ") == 1, raw
        ok(send(fresh_agent, "GET", "/Version"))
        assert fresh_agent.stop() == 0
        assert "Traceback" not in fresh_agent.output()
