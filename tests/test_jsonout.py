"""jsonout: every fast path gives exactly the bytes json.dumps gives (compact, ASCII)."""

from __future__ import annotations

import json

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack_core.jsonout import EncodedJson, encode_json, escaped, text, text_list

TEXT = st.text(alphabet=st.sampled_from(list('ab\n"\\/\t\r é\u2028\x00\x1f\x7f-=+~ ')), max_size=700)


def reference(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class TestEncodeJson:
    @settings(max_examples=400, deadline=None)
    @given(TEXT, st.lists(TEXT, max_size=3), st.integers(), st.booleans())
    def test_equals_json_dumps(self, value: str, values: list[str], number: int, flag: bool) -> None:
        """Objects with short, long, PEM-like and hostile strings encode as json.dumps does,
        with and without the fast paths for text."""
        pem = "-----BEGIN X-----\n" + ("QUJD" * 16 + "\n") * 10 + value
        doc = {"a": value, "pem": pem, "chain": [pem, *values], "n": number, "b": flag}
        assert encode_json(doc) == reference(doc)
        assert encode_json([value, pem]) == reference([value, pem])
        fast = {"a": value, "pem": text(pem), "chain": text_list([pem, *values]),
                "n": number, "b": flag}
        assert encode_json(fast) == reference(doc)

    @given(TEXT)
    def test_encoded_values_are_inserted(self, value: str) -> None:
        """EncodedJson values go in as they are; string() and hex() build valid JSON."""
        doc = {"s": EncodedJson.string([escaped(value[:5]), escaped(value[5:])]),
               "h": EncodedJson.hex(value.encode()), "x": 1}
        assert json.loads(encode_json(doc)) == {"s": value, "h": value.encode().hex(), "x": 1}
        assert encode_json(EncodedJson((b"[1",  memoryview(b"]")))) == b"[1]"
        assert encode_json({"a": EncodedJson((b"[", b"1]"))}) == b'{"a":[1]}'



class TestLargeBodies:
    """A body of kept pieces from STREAMED_BODY_MIN on is written piece by piece: the bytes
    on the wire and Content-Length are the joined body's, HEAD included."""

    @staticmethod
    def _serve(obj: object, method: str) -> tuple[int, dict[str, str], bytes]:
        import asyncio

        from aiohttp import web
        from aiohttp.test_utils import TestClient, TestServer

        from dstack_core.server.errors import json_response

        async def handler(request: web.Request) -> web.Response:
            return json_response(obj)

        async def run() -> tuple[int, dict[str, str], bytes]:
            app = web.Application()
            app.router.add_get("/", handler)
            async with TestClient(TestServer(app)) as client:
                resp = await client.request(method, "/")
                return resp.status, dict(resp.headers), await resp.read()

        return asyncio.run(run())

    @pytest.mark.parametrize("size", [1_000, 300_000, 3_000_000])
    def test_pieces_arrive_joined(self, size: int) -> None:
        chunk = bytearray(b"ab" * (size // 8))
        log = EncodedJson.string([bytes(chunk), memoryview(bytes(chunk)), b"\\n", bytes(chunk)])
        obj = {"quote": EncodedJson.hex(b"\x01" * 100), "event_log": log, "n": 7}
        expected = json.dumps(
            {"quote": "01" * 100, "event_log": json.loads(log.data), "n": 7}, separators=(",", ":")
        ).encode()
        from aiohttp.payload import Payload

        from dstack_core.server.errors import STREAMED_BODY_MIN, json_response

        streamed = isinstance(json_response(obj).body, Payload)
        assert streamed == (len(expected) >= STREAMED_BODY_MIN)
        status, headers, body = self._serve(obj, "GET")
        assert status == 200 and body == expected
        assert int(headers["Content-Length"]) == len(expected)
        assert headers["Content-Type"] == "application/json"
        status, headers, body = self._serve(obj, "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(expected)

    def test_size_counts_bytes_of_memoryviews(self) -> None:
        view = memoryview(b"abcd").cast("H")  # 2 items, 4 bytes
        assert EncodedJson((b"xy", view)).size == 6
