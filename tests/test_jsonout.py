"""jsonout: every fast path gives exactly the bytes json.dumps gives (compact, ASCII)."""

from __future__ import annotations

import json

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

