"""Settings for the drop-in: upstream's dstack.toml, layered config files, the new keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dstack_core.config import load_settings, translate_upstream_config
from dstack_core.errors import ConfigurationError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_translation_of_the_keys_upstreams_image_uses():
    ours, ignored, unknown = translate_upstream_config({
        "default": {"workers": 8, "ident": "x", "core": {
            "keys_file": "/k", "compose_file": "/c", "sys_config_file": "/s", "data_disks": ["/"],
        }},
        "internal": {"address": "unix:/run/d.sock", "reuse": True},
        "internal-v0": {"address": "unix:/run/t.sock"},
        "external": {"address": "::", "port": 8090},
        "guest-api": {"address": "vsock:0xffffffff", "port": 8000},
    })
    assert ours == {
        "appkeys": "/k", "app_compose": "/c", "sys_config": "/s", "data_disks": ["/"],
        "socket": "/run/d.sock", "tappd_socket": "/run/t.sock", "external_listen": "[::]:8090",
    }
    assert "default.workers" in ignored and "internal.reuse" in ignored
    assert any(item.startswith("guest-api") for item in ignored)
    assert unknown == []


def test_global_overrides_default_and_tcp_internal_is_listen():
    ours, _, _ = translate_upstream_config({
        "default": {"core": {"keys_file": "/a"}, "port": 1},
        "global": {"core": {"keys_file": "/b"}},
        "internal": {"address": "127.0.0.1"},
    })
    assert ours == {"appkeys": "/b", "listen": "127.0.0.1:1"}


@pytest.mark.parametrize(("doc", "message"), [
    ({"default": {"core": {"keys_file": 5}}}, "default.core.keys_file must be a string"),
    ({"default": {"core": {"data_disks": "/"}}}, "data_disks must be a list"),
    ({"external": {"address": "unix:/x"}}, "[external] must be a TCP address"),
    ({"internal-v0": {"address": "0.0.0.0", "port": 1}}, "must be a unix: address"),
    ({"default": []}, "[default] must be a table"),
])
def test_translation_refuses_wrong_types(doc, message):
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        translate_upstream_config(doc)


def test_unknown_keys_are_reported_not_fatal(tmp_path, caplog):
    path = write(tmp_path, "dstack.toml", 'platform = "simulator"\n[default.core]\n'
                 'keys_file = "/k"\nmystery = 1\n[experimental]\nx = 1\n')
    with caplog.at_level(logging.INFO):
        settings = load_settings({}, config_file=path, environ={})
    assert settings.platform == "simulator" and settings.appkeys == Path("/k")
    assert "unknown keys ignored: default.core.mystery, experimental" in caplog.text


def test_later_files_override_earlier_ones(tmp_path):
    """dstack-prepare's agent.json (data disks) over /etc/dstack/dstack.toml, as upstream
    layers them; our own keys may sit in either."""
    base = write(tmp_path, "dstack.toml", '[default.core]\nkeys_file = "/k"\ndata_disks = ["/"]\n'
                 '[external]\naddress = "0.0.0.0"\nport = 8090\n')
    overlay = write(tmp_path, "agent.json", json.dumps(
        {"default": {"core": {"data_disks": ["/", "/data"]}}, "kms_timeout": 3}
    ))
    settings = load_settings({"platform": "tdx"}, config_file=[base, overlay], environ={})
    assert settings.data_disks == (Path("/"), Path("/data"))
    assert settings.appkeys == Path("/k") and settings.external_listen == ("0.0.0.0", 8090)
    assert settings.kms_timeout == 3.0


@pytest.mark.parametrize(("flags", "message"), [
    ({"attestation_format": "cbor"}, "attestation_format must be one of"),
    ({"kms_timeout": 0}, "kms_timeout must be seconds"),
    ({"kms_timeout": 1000}, "kms_timeout must be seconds"),
    ({"external_listen": "8090"}, "--external-listen must be HOST:PORT"),
    ({"tappd_socket": Path("/var/run/dstack.sock")}, "--tappd-socket must differ"),
    ({"tappd_socket": Path("/" + "x" * 120)}, "socket path is longer"),
])
def test_bad_values_fail_closed(flags, message):
    with pytest.raises(ConfigurationError, match=message):
        load_settings({"platform": "simulator", **flags}, config_file=None, environ={})


def test_our_files_still_refuse_unknown_keys(tmp_path):
    path = write(tmp_path, "agent.toml", 'platform = "simulator"\ntapd_socket = "/x"\n')
    with pytest.raises(ConfigurationError, match="unknown keys"):
        load_settings({}, config_file=path, environ={})
