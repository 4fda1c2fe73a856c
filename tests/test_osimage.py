"""OS image policies (dstack_core.osimage): the file format and the os_image decision."""

from __future__ import annotations

import json

import pytest

from dstack_core.errors import ConfigurationError, EvidenceError
from dstack_core.osimage import (
    OsImagePolicy,
    check_os_image,
    parse_rtmr_expectation,
    stated_os_image_hash,
    with_expectations,
)

MRTD = b"\x01" * 48
RTMRS = (b"\x02" * 48, b"\x03" * 48, b"\x04" * 48, b"\x05" * 48)
IMAGE = b"\xaa" * 32
OTHER = b"\xbb" * 32


def policy_doc(*entries: tuple[bytes, bytes, tuple[bytes, ...]]) -> dict:
    return {
        "version": 1,
        "images": {
            h.hex(): {"mrtd": m.hex(), **{f"rtmr{i}": r[i].hex() for i in range(3)}}
            for h, m, r in entries
        },
    }


def check(policy: OsImagePolicy | None, *, measured: bytes | None = None,
          stated: bytes | None = None):
    return check_os_image(policy, mrtd=MRTD, rtmrs=RTMRS, measured=measured, stated=stated)


class TestPolicyFile:
    def test_round_trip(self):
        """A policy parses, matches its registers, and writes the same document back."""
        doc = policy_doc((IMAGE, MRTD, RTMRS))
        doc["images"][IMAGE.hex()]["label"] = "v1"
        policy = OsImagePolicy.from_json(json.dumps(doc))
        assert policy.images[0].os_image_hash == IMAGE and policy.images[0].label == "v1"
        assert policy.to_json() == doc

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("not json", "not valid JSON"),
            ('{"images": {}, "images": {}}', "not valid JSON"),
            ("[]", "must be an object"),
            ('{"version": 2, "images": {"x": {}}}', "unsupported version"),
            ('{"version": 1.0, "images": {"x": {}}}', "unsupported version"),
            ('{"images": {}}', "non-empty"),
            ('{"images": {"zz": {}}}', "hex"),
            ('{"images": {"' + "aa" * 31 + '": {}}}', "32 bytes"),
            ('{"images": {"' + "aa" * 32 + '": {"mrtd": "00"}}}', "missing keys"),
            ('{"images": {"' + "aa" * 32 + '": []}}', "must be an object"),
            ('{"images": {}, "extra": 1}', "must be an object"),
        ],
    )
    def test_malformed(self, text, message):
        """Every malformed policy is a configuration error naming what is wrong."""
        with pytest.raises(ConfigurationError, match=message):
            OsImagePolicy.from_json(text)

    def test_wrong_register_length(self):
        doc = policy_doc((IMAGE, MRTD, RTMRS))
        doc["images"][IMAGE.hex()]["rtmr1"] = "00"
        with pytest.raises(ConfigurationError, match="48 bytes"):
            OsImagePolicy.from_json(json.dumps(doc))

    def test_expectations(self):
        """--expect-rtmr N=HEX takes N 0-2 only, once per value; --expect-mrtd 48 bytes."""
        assert parse_rtmr_expectation("1=" + "03" * 48) == (1, b"\x03" * 48)
        for bad in ("3=" + "00" * 48, "x=00", "0", "0=zz", "0=" + "00" * 47):
            with pytest.raises(ConfigurationError):
                parse_rtmr_expectation(bad)
        with pytest.raises(ConfigurationError, match="twice"):
            with_expectations(None, None, ["0=" + "00" * 48, "0=" + "11" * 48])
        assert with_expectations(None, None, []) is None
        combined = with_expectations(None, MRTD.hex(), ["2=" + RTMRS[2].hex()])
        assert combined is not None and combined.expected is not None
        assert combined.expected.compared() == ["MRTD", "RTMR2"]


class TestStated:
    @pytest.mark.parametrize(
        ("vm_config", "expected"),
        [
            ("", None),
            ("{}", None),
            (json.dumps({"os_image_hash": IMAGE.hex()}), IMAGE),
            (json.dumps({"vm_config": json.dumps({"os_image_hash": IMAGE.hex()})}), IMAGE),
        ],
    )
    def test_read(self, vm_config, expected):
        """A vm_config, or a sys-config nesting it as a string, as upstream reads them."""
        assert stated_os_image_hash(vm_config) == expected

    @pytest.mark.parametrize(
        "vm_config",
        ["not json", '{"os_image_hash": "aa", "os_image_hash": "bb"}', '{"os_image_hash": 5}',
         '{"os_image_hash": "zz"}'],
    )
    def test_unreadable(self, vm_config):
        """Duplicate keys (two parsers, two hashes), wrong types, bad hex: unreadable."""
        with pytest.raises(EvidenceError):
            stated_os_image_hash(vm_config)


class TestDecision:
    def test_no_policy(self):
        """Unverified: nothing bound without a measured event; the measured event is bound."""
        outcome = check(None, stated=IMAGE)
        assert outcome.status == "skipped" and outcome.os_image_hash == b""
        assert outcome.detail.startswith("UNVERIFIED")
        outcome = check(None, measured=IMAGE)
        assert outcome.status == "skipped" and outcome.os_image_hash == IMAGE
        assert check(None, measured=IMAGE, stated=OTHER).status == "fail"

    def test_policy_binds_through_registers(self):
        policy = OsImagePolicy.single(IMAGE, MRTD, RTMRS)
        outcome = check(policy)
        assert (outcome.status, outcome.os_image_hash, outcome.verified) == ("pass", IMAGE, True)
        assert check(policy, stated=IMAGE).status == "pass"
        assert check(policy, stated=OTHER).status == "fail"
        assert check(policy, measured=IMAGE).status == "pass"
        assert check(policy, measured=OTHER).status == "fail"

    def test_registers_of_no_known_image(self):
        policy = OsImagePolicy.single(IMAGE, MRTD, (RTMRS[0], b"\x00" * 48, RTMRS[2]))
        outcome = check(policy)
        assert outcome.status == "fail" and outcome.os_image_hash == b""

    def test_ambiguous_images(self):
        """Two known images with the same registers: the measured event or the vm_config
        picks one of them; nothing picks: fail."""
        policy = OsImagePolicy.from_json(
            json.dumps(policy_doc((IMAGE, MRTD, RTMRS), (OTHER, MRTD, RTMRS)))
        )
        assert check(policy).status == "fail"
        assert check(policy, stated=OTHER).os_image_hash == OTHER
        assert check(policy, measured=IMAGE).os_image_hash == IMAGE
        assert check(policy, measured=IMAGE, stated=OTHER).status == "fail"

    def test_expected_registers_and_images_both_hold(self):
        images = OsImagePolicy.single(IMAGE, MRTD, RTMRS)
        both = OsImagePolicy.combine(images, MRTD, {1: RTMRS[1]})
        assert check(both).status == "pass"
        wrong = OsImagePolicy.combine(images, b"\x09" * 48, {})
        outcome = check(wrong)
        assert outcome.status == "fail" and "MRTD" in outcome.detail
