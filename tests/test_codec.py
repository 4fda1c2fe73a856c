"""Request decoding (dstack_core.server.codec): pure unit tests, no agent."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from dstack_core.errors import (
    InvalidContentEncoding,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedContentEncoding,
)
from dstack_core.server.codec import (
    U64_MAX,
    Field,
    decode_args,
    decode_content,
    parse_json_body,
    parse_query,
    to_json_bytes,
)

TLS_SCHEMA = (
    Field("subject", "str"),
    Field("alt_names", "str_list"),
    Field("usage_ra_tls", "bool"),
    Field("not_before", "u64"),
    Field("report_data", "bytes"),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


def query(text: str):
    """The query MultiDict aiohttp hands the handler for ``?text``."""
    return URL(f"/m?{text}").query


def rejected(call, *args, code: str = "invalid_request") -> str:
    with pytest.raises(InvalidRequest) as info:
        call(*args)
    assert info.value.code == code
    return info.value.message


class TestFieldDecoding:
    @pytest.mark.parametrize(
        ("kind", "value", "expected"),
        [
            ("str", "", ""),
            ("str", "Zürich", "Zürich"),
            ("bytes", "", b""),
            ("bytes", "00ff", b"\x00\xff"),
            ("bytes", "00FF", b"\x00\xff"),
            ("bytes", "0xAbCd", b"\xab\xcd"),
            ("bytes", "0x0x01", b"\x01"),
            ("bytes", "0x", b""),
            ("bool", True, True),
            ("bool", False, False),
            ("u64", 0, 0),
            ("u64", U64_MAX, U64_MAX),
            ("u64", None, None),
            ("str_list", [], ()),
            ("str_list", ["a", "b"], ("a", "b")),
        ],
    )
    def test_accepts(self, kind, value, expected):
        """Well-typed values decode; hex takes upper case and any number of leading 0x."""
        assert Field("f", kind).decode(value) == expected

    @pytest.mark.parametrize(
        ("kind", "value"),
        [
            ("str", 1),
            ("str", None),
            ("str", True),
            ("str", ["a"]),
            ("str", {"a": "b"}),
            ("bytes", 1),
            ("bytes", None),
            ("bytes", ["00"]),
            ("bytes", True),
            ("bool", "true"),
            ("bool", 1),
            ("bool", 0),
            ("bool", None),
            ("bool", "1"),
            ("u64", -1),
            ("u64", U64_MAX + 1),
            ("u64", 1.0),
            ("u64", 1.5),
            ("u64", "1"),
            ("u64", True),
            ("u64", [1]),
            ("str_list", "a"),
            ("str_list", None),
            ("str_list", [1]),
            ("str_list", [None]),
            ("str_list", {"0": "a"}),
        ],
    )
    def test_rejects_wrong_type(self, kind, value):
        """A wrong JSON type or an out-of-range integer is InvalidRequest naming the field."""
        assert "'f" in rejected(Field("f", kind).decode, value)

    @pytest.mark.parametrize("value", ["abc", "zz", "0xg0", "é0", "0X00", " 00", "00 "])
    def test_rejects_bad_hex(self, value):
        """Odd length or a non-hex character (only lowercase 0x is a prefix) is invalid_hex."""
        assert "'f'" in rejected(Field("f", "bytes").decode, value, code="invalid_hex")

    @pytest.mark.parametrize(("kind", "value"), [("str", "\ud800"), ("str_list", ["ok", "\udfff"])])
    def test_rejects_lone_surrogates(self, kind, value):
        """A string that is not valid Unicode (JSON escape of a lone surrogate) is rejected."""
        assert "Unicode" in rejected(Field("f", kind).decode, value)

    def test_defaults(self):
        """Missing fields take "", b"", False, (), and None for the optional u64."""
        assert decode_args(TLS_SCHEMA, {}) == {
            "subject": "",
            "alt_names": (),
            "usage_ra_tls": False,
            "not_before": None,
            "report_data": b"",
        }

    def test_unknown_fields_ignored(self):
        """Unknown and differently spelled keys are ignored; the real field keeps its default."""
        args = decode_args(TLS_SCHEMA, {"reportData": "zz", "extra": [1, {}], "subject": "s"})
        assert args["report_data"] == b"" and args["subject"] == "s"
        assert set(args) == {f.name for f in TLS_SCHEMA}

    @given(json_values)
    def test_any_json_value_decodes_or_is_invalid_request(self, value):
        """No JSON value makes any field decoder raise anything but InvalidRequest."""
        for kind in ("str", "bytes", "bool", "u64", "str_list"):
            try:
                Field("f", kind).decode(value)
            except InvalidRequest:
                pass

    @given(st.binary(max_size=80), st.booleans(), st.booleans())
    def test_hex_round_trip(self, data, upper, prefixed):
        """Any bytes survive hex in either case, with or without 0x."""
        text = data.hex().upper() if upper else data.hex()
        assert Field("f", "bytes").decode(("0x" if prefixed else "") + text) == data


class TestJsonBody:
    @pytest.mark.parametrize("body", [b"", b"  \r\n\t", b"{}", b" {} "])
    def test_empty_means_defaults(self, body):
        """An empty or whitespace-only body, or {}, is an empty argument object."""
        assert parse_json_body(body) == {}

    def test_object(self):
        """A JSON object is returned as is (no schema applied here)."""
        assert parse_json_body(b'{"a": [1, null], "b": "\\u00e9"}') == {"a": [1, None], "b": "é"}

    @pytest.mark.parametrize(
        ("body", "fragment"),
        [
            (b"not json", "not valid JSON"),
            (b"{", "not valid JSON"),
            (b'{"a": 1} x', "not valid JSON"),
            (b"{'a': 1}", "not valid JSON"),
            (b'{"a": 1,}', "not valid JSON"),
            (b"\xef\xbb\xbf{}", "not valid JSON"),
            (b"[]", "JSON object, got list"),
            (b'"s"', "JSON object, got str"),
            (b"1", "JSON object, got int"),
            (b"1.5", "JSON object, got float"),
            (b"null", "JSON object, got NoneType"),
            (b"true", "JSON object, got bool"),
            (b"\xff\xfe{}", "not UTF-8"),
            (b'{"a": "\xc3"}', "not UTF-8"),
            (b"[" * 100_000, "nested too deeply"),
            (b'{"a":' * 100_000, "nested too deeply"),
            (b'{"a": NaN}', "NaN is not valid JSON"),
            (b'{"a": Infinity}', "Infinity is not valid JSON"),
            (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
            (b'{"a": ' + b"1" * 5000 + b"}", "integer too long"),
        ],
    )
    def test_rejects(self, body, fragment):
        """Non-JSON, non-object, non-UTF-8, too deep, NaN and giant integers are invalid_json."""
        assert fragment in rejected(parse_json_body, body, code="invalid_json")

    @pytest.mark.parametrize("body", [b'{"a": 1, "a": 1}', b'{"x": {"y": 1, "y": 2}}'])
    def test_rejects_duplicate_keys(self, body):
        """Duplicate keys, at any depth, are an error (serde's rule), not last-one-wins."""
        assert "duplicate key" in rejected(parse_json_body, body, code="invalid_json")

    @given(st.binary(max_size=200))
    def test_any_bytes_parse_or_are_invalid_request(self, body):
        """No byte string makes the body parser raise anything but InvalidRequest."""
        try:
            assert isinstance(parse_json_body(body), dict)
        except InvalidRequest:
            pass


class TestQuery:
    def test_scalars(self):
        """Strings and hex come verbatim (percent-decoded); booleans and integers are converted."""
        doc = parse_query(
            query("subject=a%20b&report_data=0xAB&usage_ra_tls=1&not_before=12"), TLS_SCHEMA
        )
        assert doc == {
            "subject": "a b",
            "report_data": "0xAB",
            "usage_ra_tls": True,
            "not_before": 12,
        }

    @pytest.mark.parametrize(
        ("text", "value"), [("true", True), ("1", True), ("false", False), ("0", False)]
    )
    def test_booleans(self, text, value):
        """Booleans are true/false/1/0."""
        assert parse_query(query(f"usage_ra_tls={text}"), TLS_SCHEMA) == {"usage_ra_tls": value}

    @pytest.mark.parametrize(
        "text",
        [
            "alt_names[0]=x&alt_names[1]=y",
            "alt_names[1]=y&alt_names[0]=x",
            "alt_names[]=x&alt_names[]=y",
            "alt_names=x&alt_names=y",
            "alt_names%5B0%5D=x&alt_names%5B1%5D=y",
        ],
    )
    def test_lists(self, text):
        """Lists use indexed, empty-bracket or repeated keys; indices order the items."""
        assert parse_query(query(text), TLS_SCHEMA) == {"alt_names": ["x", "y"]}

    def test_unknown_and_empty(self):
        """Unknown keys are ignored and an empty query is no arguments."""
        assert parse_query(query("json&x=1&reportData=zz"), TLS_SCHEMA) == {}
        assert parse_query(query(""), TLS_SCHEMA) == {}

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("usage_ra_tls=yes", "invalid boolean"),
            ("usage_ra_tls=True", "invalid boolean"),
            ("usage_ra_tls=", "invalid boolean"),
            ("not_before=-1", "invalid unsigned integer"),
            ("not_before=1.5", "invalid unsigned integer"),
            ("not_before=", "invalid unsigned integer"),
            ("not_before=%C2%B2", "invalid unsigned integer"),
            ("not_before=%D9%A1", "invalid unsigned integer"),
            ("not_before=" + "1" * 5000, "out of range"),
            ("alt_names[" + "1" * 5000 + "]=a", "out of range"),
            ("subject=a&subject=b", "duplicate field"),
        ],
    )
    def test_rejects(self, text, fragment):
        """Bad booleans, non-ASCII-digit or giant integers, giant indices, repeated scalars."""
        assert fragment in rejected(parse_query, query(text), TLS_SCHEMA)

    def test_u64_range_left_to_the_field(self):
        """A 20-digit value over 2**64-1 parses here and is rejected by the field decoder."""
        doc = parse_query(query(f"not_before={U64_MAX + 1}"), TLS_SCHEMA)
        assert "out of range" in rejected(decode_args, TLS_SCHEMA, doc)
        assert parse_query(query(f"not_before=000{U64_MAX}"), TLS_SCHEMA) == {"not_before": U64_MAX}


class TestJsonOutput:
    def test_compact_ascii(self):
        """Output is compact JSON with every non-ASCII character escaped."""
        out = to_json_bytes({"a": "é€\ud800", "b": [1, True, None]})
        assert out == b'{"a":"\\u00e9\\u20ac\\ud800","b":[1,true,null]}'
        assert json.loads(out) == {"a": "é€\ud800", "b": [1, True, None]}


class TestContentEncoding:
    BODY = b'{"path": "a", "purpose": "b"}'

    @pytest.mark.parametrize(
        ("coding", "encoded"),
        [
            ("gzip", gzip.compress(BODY)),
            ("x-gzip", gzip.compress(BODY)),
            (" GZip ", gzip.compress(BODY)),
            ("deflate", zlib.compress(BODY)),
            ("deflate", zlib.compress(BODY)[2:-4]),  # raw deflate, as some clients send it
            ("identity", BODY),
            ("", BODY),
            ("identity, gzip", gzip.compress(BODY)),
            ("gzip, deflate", zlib.compress(gzip.compress(BODY))),
            ("gzip", gzip.compress(BODY[:10]) + gzip.compress(BODY[10:])),
        ],
        ids=["gzip", "x-gzip", "spaced", "zlib", "raw-deflate", "identity", "empty", "list",
             "in-order", "members"],
    )
    def test_decodes(self, coding, encoded):
        """Supported codings, lists of them (applied in order), gzip members, raw deflate."""
        assert decode_content(encoded, coding, 1024) == self.BODY

    @pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "x-foo", "*"])
    def test_unsupported(self, coding):
        """Any other coding is 415, named in no message (nothing echoed)."""
        with pytest.raises(UnsupportedContentEncoding) as raised:
            decode_content(self.BODY, coding, 1024)
        assert raised.value.http_status == 415 and coding.strip() not in raised.value.message

    @pytest.mark.parametrize(
        ("coding", "encoded"),
        [
            ("gzip", BODY),
            ("gzip", gzip.compress(BODY)[:-5]),
            ("gzip", gzip.compress(BODY) + b"junk"),
            ("deflate", b"\xff" * 16),
            ("deflate", zlib.compress(BODY) + b"x"),
            ("gzip", b""),
        ],
        ids=["plain", "truncated", "trailing", "garbage", "trailing-zlib", "empty"],
    )
    def test_invalid(self, coding, encoded):
        """A body that is not what its coding says is 400 invalid_content_encoding."""
        with pytest.raises(InvalidContentEncoding):
            decode_content(encoded, coding, 1024)

    def test_decoded_size_limit(self):
        """The limit holds for the decoded size (a bomb stops at limit + 1 bytes)."""
        bomb = gzip.compress(b"0" * 10_000_000)
        with pytest.raises(PayloadTooLarge):
            decode_content(bomb, "gzip", 1 << 20)
        assert decode_content(gzip.compress(b"0" * 1024), "gzip", 1024) == b"0" * 1024
